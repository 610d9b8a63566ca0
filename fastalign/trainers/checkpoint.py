"""Training checkpoints that survive a kill at any moment, and what a trainer puts in them.

A checkpoint is one directory ``<output>/checkpoints/step-000120/`` holding ``state.pt`` (model,
optimizer, scheduler, random-number generators, data position, trainer extras) and
``manifest.json`` (the step, and the size and SHA-256 of ``state.pt``).

Atomicity: everything is written into a hidden ``.tmp-step-000120`` directory, flushed to disk
(fsync), and only then renamed to ``step-000120``; a rename within a directory is atomic on POSIX
file systems, so a reader sees either no checkpoint or a complete one. A checkpoint that is
nevertheless damaged on disk (truncated, edited) fails its manifest check; ``load_latest`` then
warns, names what is wrong, and falls back to the previous good checkpoint.

A trainer's state (:func:`save_training_checkpoint`, :func:`resume_training`) is its model,
optimizer, scheduler, every random generator of every rank and the data position, so that
resuming gives the same weights and metrics as an uninterrupted run (on CPU, where kernels are
deterministic).

A run never continues another run by accident (:func:`prepare_output_dir`): a fresh run refuses
an output directory that holds an earlier one unless told to overwrite it, ``resume`` refuses a
directory with no checkpoint, and a checkpoint records the options and a fingerprint of the
training data, which a resumed run must match (:data:`~fastalign.trainers.config.
RESUMABLE_CHANGES` lists the options it may change).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from array import array
from pathlib import Path
from typing import Any

import torch

from fastalign.ops._checks import first_line
from fastalign.trainers import distributed
from fastalign.trainers.config import RESUMABLE_CHANGES

__all__ = ["CheckpointError", "checkpoint_dirs", "data_fingerprint", "gathered_states",
           "load_latest", "prepare_output_dir", "resume_training", "rng_state", "save_checkpoint",
           "save_training_checkpoint", "seed_everything", "set_rng_state"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = "state.pt"
_MANIFEST_FILE = "manifest.json"
# What a run writes into its output directory and ``overwrite`` deletes; the model and tokenizer
# files are replaced by the new run's own at its end, and anything else is left alone.
_RUN_RECORDS = ("checkpoints", "metrics.jsonl", "metrics.csv", "plots", "runs")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, wrong size or checksum, unreadable."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """The complete (renamed) checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(root: str | Path, step: int, state: dict[str, Any], *,
                    keep: int | None = None) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; keep the newest ``keep`` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a run killed while saving
    for leftover in root.glob(".tmp-delete-*"):  # ... or while deleting an old checkpoint
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    state_path = tmp / _STATE_FILE
    torch.save(state, state_path)
    manifest = {"step": step, "files": {_STATE_FILE: {"bytes": state_path.stat().st_size,
                                                      "sha256": _sha256(state_path)}}}
    (tmp / _MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    for path in (state_path, tmp / _MANIFEST_FILE, tmp):
        _fsync_path(path)
    if final.exists():  # the same step saved again (a resumed run): replace it
        _remove(final)
    os.rename(tmp, final)
    _fsync_path(root)
    if keep is not None:
        for _, old in checkpoint_dirs(root)[:-keep]:
            _remove(old)
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint directory so that a kill midway never leaves a half-deleted
    ``step-*``: rename it out of the way (atomic) first, then delete the renamed copy."""
    doomed = checkpoint.with_name(f".tmp-delete-{checkpoint.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify ``path`` against its manifest and load its state; ``CheckpointError`` if damaged."""
    path = Path(path)
    manifest_path = path / _MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"][_STATE_FILE]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable {_MANIFEST_FILE} ({error})") from None
    state_path = path / _STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {_STATE_FILE} is missing")
    size = state_path.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"checkpoint {path}: {_STATE_FILE} has {size} bytes, the manifest "
                              f"says {expected['bytes']} (truncated or overwritten)")
    if _sha256(state_path) != expected["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {_STATE_FILE} does not match the SHA-256 "
                              "of its manifest (corrupted)")
    # weights_only: a checkpoint holds tensors and plain data only, so loading one never runs
    # code, even from a folder someone else wrote (the manifest's SHA-256 catches damage, not a
    # deliberate edit). Anything else in the pickle is refused here.
    try:
        return torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (any unpickling failure means unusable)
        raise CheckpointError(f"checkpoint {path}: cannot load {_STATE_FILE} as tensors and "
                              f"plain data ({first_line(error)})") from None


def load_latest(root: str | Path) -> tuple[int, dict[str, Any]] | None:
    """The newest good checkpoint under ``root`` as ``(step, state)``, or None if there is none.

    A damaged checkpoint is skipped with a warning that says why; if every checkpoint is damaged,
    ``CheckpointError`` lists them all rather than silently starting from scratch.
    """
    problems = []
    for step, path in reversed(checkpoint_dirs(root)):
        try:
            return step, load_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            warnings.warn(f"{error}; falling back to the previous checkpoint", stacklevel=2)
    if problems:
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
    return None


# ----------------------------------------------------------------------------------------------
# A trainer's state (``trainer`` is a ``fastalign.trainers.loop.Trainer``)
# ----------------------------------------------------------------------------------------------


def save_training_checkpoint(trainer) -> Path | None:
    """Write the trainer's checkpoint (rank 0 writes; with several ranks, every rank must call
    it)."""
    model_state, modules_state, optim_state = gathered_states(trainer, with_optimizer=True)
    dist = trainer.dist
    state = {
        "step": trainer.step,
        "num_tokens": trainer.num_tokens_seen,
        "trainer": trainer.name,
        "config": dataclasses.asdict(trainer.config),
        "model": model_state,
        "modules": modules_state,
        "optimizer": optim_state,
        # Optimizer state keyed by parameter names (several ranks) or by position (one).
        "layout": "distributed" if dist.enabled else "single",
        "scheduler": trainer.scheduler.state_dict(),
        "stream": trainer.stream.state_dict(),
        "rng": distributed.gather_objects(rng_state(), dist),
        "extra": trainer.extra_state(),
        "data": trainer.data_fingerprint,
    }
    path = None
    if dist.is_main:
        path = save_checkpoint(trainer.checkpoint_root, trainer.step, state,
                               keep=trainer.config.save_total_limit)
    distributed.barrier(dist)
    return path


def gathered_states(trainer, *, with_optimizer: bool) -> tuple[dict, dict, dict | None]:
    """(model, extra modules, optimizer) states, whole, on rank 0 (gathered under FSDP)."""
    if not trainer.dist.enabled:
        optim = trainer.optimizer.state_dict() if with_optimizer else None
        return (trainer.model.state_dict(),
                {name: m.state_dict() for name, m in trainer.modules_to_save().items()}, optim)
    full, optim = distributed.full_state_dicts(
        trainer.engine, trainer.optimizer if with_optimizer else None, trainer.dist)
    modules = {name: distributed.strip_prefix(full, f"extra.{name}.")
               for name in trainer.modules_to_save()}
    return distributed.strip_prefix(full, "model."), modules, optim


def resume_training(trainer) -> bool:
    """Load the newest good checkpoint into ``trainer``; False when there is none (a fresh
    start)."""
    root, dist = trainer.checkpoint_root, trainer.dist
    latest = load_latest(root)
    if latest is None:
        return False
    step, state = latest
    if state.get("trainer") != trainer.name:
        raise ValueError(f"{root} holds a {state.get('trainer')!r} run, not "
                         f"{trainer.name!r}; use another --output directory")
    _check_same_run(trainer, step, state)
    layout = "distributed" if dist.enabled else "single"
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one rank
    if state.get("layout", "single") != layout or len(rngs) != dist.world_size:
        raise ValueError(
            f"{root} was written by {len(rngs)} process(es); resume it with "
            f"as many (this run has {dist.world_size})")
    if dist.enabled:
        full = {f"model.{key}": value for key, value in state["model"].items()}
        for name, module_state in state["modules"].items():
            full |= {f"extra.{name}.{key}": value for key, value in module_state.items()}
        distributed.load_full_state_dicts(trainer.engine, trainer.optimizer, full,
                                          state["optimizer"])
    else:
        try:
            trainer.model.load_state_dict(state["model"])
        except RuntimeError as error:  # another architecture or size: a wall of key names
            raise ValueError(f"{root}: the checkpoint of step {step} does not fit this model "
                             f"({first_line(error)}); resume with the --model the run started "
                             f"from") from None
        for name, module in trainer.modules_to_save().items():
            module.load_state_dict(state["modules"][name])
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.stream.load_state_dict(state["stream"])
    trainer.load_extra_state(state["extra"])
    set_rng_state(rngs[dist.rank])
    trainer.step = step
    trainer.num_tokens_seen = state.get("num_tokens", 0)
    if dist.is_main:
        trainer.metrics_log.restore(step)
    return True


def prepare_output_dir(trainer) -> None:
    """Refuse an output directory that would mix two runs; clear it when asked to overwrite.

    A fresh run into a directory holding an earlier run's metrics or checkpoints would otherwise
    overwrite the metrics but keep the checkpoints, which a later ``resume`` would continue; and
    ``resume`` with nothing to resume would silently start from scratch. Every rank checks before
    rank 0 deletes anything, so that all of them see the same directory.
    """
    config, output = trainer.config, trainer.output_dir
    checkpoints = checkpoint_dirs(trainer.checkpoint_root)
    metrics = output / "metrics.jsonl"
    logged = metrics.is_file() and metrics.stat().st_size > 0
    if config.resume and not checkpoints:
        held = " (it holds an earlier run's metrics: add --overwrite to start over)" \
            if logged else ""
        raise ValueError(f"--resume: {trainer.checkpoint_root} holds no checkpoint to continue "
                         f"from{held}; run without --resume to start a new run (checkpoints are "
                         f"written every --save-steps)")
    if not config.resume and not config.overwrite and (checkpoints or logged):
        held = [f"checkpoints up to step {checkpoints[-1][0]}"] if checkpoints else []
        if logged:
            held.append("metrics.jsonl")
        raise ValueError(f"--output {output} already holds a run ({', '.join(held)}); add "
                         f"--resume to continue it, --overwrite to replace it, or choose "
                         f"another --output")
    distributed.barrier(trainer.dist)
    if config.overwrite and trainer.dist.is_main:
        for name in _RUN_RECORDS:
            path = output / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    distributed.barrier(trainer.dist)


def data_fingerprint(examples) -> dict[str, Any]:
    """The number and a SHA-256 of the encoded training examples: a resumed run must train on
    the same data in the same order, or its saved data position points into other examples."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(example):
            value = example[key]
            digest.update(key.encode())
            if isinstance(value, torch.Tensor):
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
                digest.update(array("q", value).tobytes())  # token ids: fast and exact
            else:
                digest.update(repr(value).encode())
    return {"examples": len(examples), "sha256": digest.hexdigest()}


def _check_same_run(trainer, step: int, state: dict[str, Any]) -> None:
    """The checkpoint's options and data are this run's, except what may change on resume."""
    saved, current = state.get("config", {}), dataclasses.asdict(trainer.config)
    changed = [name for name in current if name in saved and name not in RESUMABLE_CHANGES
               and _plain(saved[name]) != _plain(current[name])]
    if changed:
        def flag(name):
            return "--" + name.replace("_", "-")

        differences = "; ".join(f"{flag(name)} was {_shown(saved[name])}, now "
                                f"{_shown(current[name])}" for name in changed)
        raise ValueError(f"--resume: the checkpoint of step {step} in {trainer.checkpoint_root} "
                         f"was trained with other options ({differences}); resume with the same "
                         f"values, or start over with --overwrite")
    fingerprint = trainer.data_fingerprint
    if "data" in state and state["data"] != fingerprint:
        saved_count = state["data"]["examples"]
        raise ValueError(f"--resume: the checkpoint of step {step} in {trainer.checkpoint_root} "
                         f"was trained on other data ({saved_count} examples, this run has "
                         f"{fingerprint['examples']}, or the same number with other contents); "
                         f"resume with the same --data and tokenizer, or start over with "
                         f"--overwrite")


def _plain(value):
    """Tuples and lists compare alike (a checkpoint may hold either)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if value is None else str(value)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from (Python's, torch's CPU and CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
