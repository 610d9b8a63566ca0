"""Multi-process training: data parallelism (DDP) and fully sharded data parallelism (FSDP2).

The trainers run unchanged under ``torchrun`` or ``accelerate launch``: both start one process per
device and set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, which is all :func:`init` reads.

Every computation that touches the model goes through one module's forward, :class:`ModelCall`,
which holds the policy (and a value head, for PPO). That module is what DDP or FSDP wraps:

* **DDP** all-reduces the gradients of every parameter used in that forward.
* **FSDP2** (``fully_shard``) shards every decoder layer and then the root. The root's forward
  gathers the parameters that live outside the layers (embeddings, final norm, *the LM head*), so
  inside :class:`ModelCall` the fused ops read the whole, unsharded head weight; after the
  forward the head is a sharded ``DTensor`` again, and a fused op handed one refuses it rather
  than compute with a shard.

Each rank takes its own slice of every global micro-batch (``batch_size`` examples of
``batch_size × world_size``), so a run on W processes sees the same global batches as one
process with ``batch_size × W``; metrics are averaged over all ranks' examples.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "none", "ddp", "fsdp")
_CREATED_GROUP = False  # init() started the process group (so shutdown() ends it)


@dataclass(frozen=True)
class DistributedState:
    """Where this process stands in the job: its rank, the world size and the strategy."""

    strategy: str = "none"  # "none", "ddp" or "fsdp"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.enabled else None


def launched_world_size() -> int:
    """The number of processes torchrun / accelerate started (1 when launched plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(strategy: str) -> str:
    """``auto``: FSDP when ``accelerate launch --use_fsdp`` started us, DDP for any other launch
    of several processes, ``none`` for one process."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed must be one of {', '.join(map(repr, STRATEGIES))}, got "
                         f"{strategy!r}")
    world = launched_world_size()
    if strategy == "auto":
        if world <= 1:
            return "none"
        accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        return "fsdp" if accelerate_fsdp else "ddp"
    if strategy != "none" and world <= 1 and not dist.is_initialized():
        raise ValueError(f"distributed={strategy!r} needs several processes: launch with "
                         f"`torchrun --nproc_per_node N -m fastalign.cli train ...` or "
                         f"`accelerate launch --num_processes N -m fastalign.cli train ...`")
    if strategy == "none" and world > 1:
        raise ValueError(f"{world} processes were launched but distributed='none': every "
                         "process would train its own model; use ddp or fsdp")
    return strategy


def resolve_device(device: str) -> torch.device:
    """The device of a one-process run: ``auto`` is cuda when there is one, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check_cuda(device)
    return torch.device(device)


def _check_cuda(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}, but torch.cuda.is_available() is False (a CPU "
                         f"build of torch {torch.__version__}, or no GPU visible); use --device "
                         f"cpu or auto")


def init(strategy: str, device: str) -> tuple[DistributedState, torch.device]:
    """Join the process group (once) and pick this rank's device; see the module docstring."""
    strategy = resolve_strategy(strategy)
    if strategy == "none":
        return DistributedState(), resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _check_cuda(device)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"with several processes, device must be auto, cpu or cuda (each rank "
                         f"takes cuda:LOCAL_RANK), got {device!r}")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        global _CREATED_GROUP
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _CREATED_GROUP = True
    state = DistributedState(strategy, dist.get_rank(), dist.get_world_size(), local_rank)
    return state, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def shutdown(*, wait_for_others: bool = True) -> None:
    """End the process group if :func:`init` started it (a caller's own group is left alone).

    After a clean run every rank first waits for the others, so that none tears the group down
    while another still uses it; after an error it does not wait (the others may never come).
    """
    global _CREATED_GROUP
    if _CREATED_GROUP and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
    _CREATED_GROUP = False


class ModelCall(nn.Module):
    """Runs ``fn(*args)`` as this module's forward, so that DDP and FSDP see every use of the
    model (and gather FSDP's parameters for it). ``model`` and ``extra`` are its parameters."""

    def __init__(self, model: nn.Module, extra: dict[str, nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.extra = nn.ModuleDict(extra or {})

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


def wrap(call: ModelCall, state: DistributedState, device: torch.device) -> nn.Module:
    """``call`` wrapped for the strategy: DDP, FSDP2 (layers, then the root), or itself."""
    if state.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            call, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)  # buffers (rotary tables) are the same on every rank
    if state.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (state.world_size,))
        layer_classes = set(getattr(_base_model(call.model), "_no_split_modules", None) or ())
        layers = [m for m in call.model.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise ValueError(f"FSDP shards a model's decoder layers, which "
                             f"{type(call.model).__name__} does not name (_no_split_modules)")
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(call, mesh=mesh)
        return call
    return call


def _base_model(model: nn.Module) -> nn.Module:
    from fastalign import hf

    return hf._unwrap(model)


def no_gradient_sync(engine: nn.Module, state: DistributedState):
    """A context in which backward accumulates gradients locally (all but the last micro-batch
    of an accumulated step): DDP's ``no_sync``; FSDP2 skips its reduce-scatter."""
    import contextlib

    if state.strategy == "ddp":
        return engine.no_sync()
    if state.strategy == "fsdp":
        @contextlib.contextmanager
        def fsdp_no_sync():
            engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                engine.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()


def gather_objects(value, state: DistributedState) -> list:
    """Every rank's ``value`` (small picklable objects: metrics), in rank order."""
    if not state.enabled:
        return [value]
    gathered = [None] * state.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(state: DistributedState) -> None:
    if state.enabled:
        dist.barrier()


def full_state_dicts(engine: nn.Module, optimizer: torch.optim.Optimizer | None,
                     state: DistributedState) -> tuple[dict, dict | None]:
    """The whole model's (and optimizer's) state on rank 0, on CPU; empty dicts elsewhere.

    Keys are ``ModelCall``'s: ``model.<name>`` and ``extra.<module>.<name>``.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(engine, options=options)
    optim_state = None if optimizer is None else get_optimizer_state_dict(engine, optimizer,
                                                                          options=options)
    return model_state, optim_state


def load_full_state_dicts(engine: nn.Module, optimizer: torch.optim.Optimizer,
                          model_state: dict, optim_state: dict) -> None:
    """Load what :func:`full_state_dicts` returned (every rank reads the same checkpoint)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(engine, model_state, options=options)
    set_optimizer_state_dict(engine, optimizer, optim_state, options=options)


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state_dict.items()
            if key.startswith(prefix)}
