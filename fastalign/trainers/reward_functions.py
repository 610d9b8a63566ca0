"""Reward functions for the online trainers (PPO, GRPO, RLOO), and how names become them.

The calling convention is TRL's (``GRPOTrainer``'s ``reward_funcs``): once per rollout, a function
gets keyword arguments ``prompts``, ``completions`` and ``completion_ids`` (the token ids up to and
including the first eos), every other column of the prompt data (``answer``, ``solution``, ...)
as a list aligned with the completions, and ``trainer_state`` (a :class:`TrainingProgress`). The
``num_generations`` completions of a prompt are consecutive, each with its own copy of the prompt
and columns. Standard data gives strings; conversational data (the prompt is a list of
``{"role", "content"}`` messages) gives those message lists as ``prompts`` and
``[{"role": "assistant", "content": text}]`` as each completion. A function returns one score per
completion, higher is better, or None (or NaN) where it does not apply (it then counts 0 in the
weighted sum, as TRL's ``nansum``; a completion that no function scores has no reward, and GRPO
and RLOO give it advantage 0 and leave it out of its group's baseline, as TRL). A function
without ``**kwargs`` gets only the arguments it names, and one naming none of them is called as
``fn(prompts, completions)``: the older convention.

Builtins, chosen by name (``PPOConfig.reward_fn`` / ``--reward-fn``):

* ``"polite"`` (the default, made for the shipped ``prompts.jsonl``): the shipped preference data
  answers each prompt politely (chosen) or rudely (rejected). A completion scores +1 for every
  word of :data:`POLITE_WORDS` (words of the chosen answers that no rejected answer uses, such as
  "sure", "glad", "step") and −1 for every word of :data:`RUDE_WORDS` (words only the rejected
  answers use, such as "whatever", "ugh", "boring"), divided by the number of words of the
  completion: a score in [−1, 1], 0 for an empty completion.
* ``"length"``: prefers completions of about :data:`LENGTH_TARGET` characters (the typical length
  of a shipped answer): ``max(−1, 1 − |characters − target| / target)``, 1 at the target.

Anything else is ``"module:function"`` (imported; a module in the working directory is found
too, as ``python -m`` would) or ``"path/to/file.py:function"`` (loaded from the file);
:func:`resolve_reward_fn` turns one spec into the callable, :class:`RewardFunctions` several
(comma-separated, with weights) into the weighted reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["BUILTIN_REWARDS", "LENGTH_TARGET", "POLITE_WORDS", "RUDE_WORDS", "RewardFn",
           "RewardFunctions", "TrainingProgress", "completion_text", "length_reward",
           "polite_reward", "resolve_reward_fn"]

RewardFn = Callable[..., Sequence[float | None]]

# Words of the shipped chosen answers that never occur in a rejected one (and vice versa); the
# tests check both lists against fastalign/assets/data/preferences*.jsonl.
POLITE_WORDS = frozenset({
    "sure", "certainly", "course", "glad", "gladly", "happy", "great", "question", "improve",
    "try", "step", "simple", "small", "checklist", "review", "first", "note", "keep", "change",
    "short", "list", "today",
})
RUDE_WORDS = frozenset({
    "whatever", "ugh", "seriously", "stop", "asking", "away", "boring", "bad", "hopeless",
    "nobody", "wants", "care", "problem", "throw", "figure", "yourself", "own", "not", "no",
})
LENGTH_TARGET = 48

_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class TrainingProgress:
    """The ``trainer_state`` a reward function receives: the attributes of TRL's ``TrainerState``
    that reward shaping reads (``global_step``: optimizer steps done; ``max_steps``)."""

    global_step: int
    max_steps: int


def completion_text(completion) -> str:
    """The text of a completion: the string itself, or the contents of its messages joined."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def polite_reward(prompts, completions, **kwargs) -> list[float]:
    """(polite words − rude words) / words of each completion, in [−1, 1]; see the module doc."""
    del prompts, kwargs  # the score depends on the answer only
    scores = []
    for completion in completions:
        words = _words(completion_text(completion))
        polite = sum(word in POLITE_WORDS for word in words)
        rude = sum(word in RUDE_WORDS for word in words)
        scores.append((polite - rude) / max(len(words), 1))
    return scores


def length_reward(prompts, completions, *, target_length: int = LENGTH_TARGET,
                  **kwargs) -> list[float]:
    """``max(−1, 1 − |len(text.strip()) − target_length| / target_length)``: 1 at
    ``target_length`` characters (not ``target``: a data column of that name would reach it)."""
    del prompts, kwargs
    if isinstance(target_length, bool) or not isinstance(target_length, int) or target_length < 1:
        raise ValueError(f"target_length must be a positive int, got {target_length!r}")
    return [max(-1.0, 1.0 - abs(len(completion_text(c).strip()) - target_length) / target_length)
            for c in completions]


BUILTIN_REWARDS: dict[str, RewardFn] = {"polite": polite_reward, "length": length_reward}


def _load_module(module_spec: str, spec: str):
    if module_spec.endswith(".py"):
        path = Path(module_spec)
        if not path.is_file():
            raise ValueError(f"reward_fn {spec!r}: no such file {module_spec!r}")
        name = f"fastalign_reward_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"reward_fn {spec!r}: cannot load {module_spec!r} as a module")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            raise ValueError(f"reward_fn {spec!r}: running {module_spec!r} failed: "
                             f"{type(error).__name__}: {error}") from error
        return module
    try:
        return _import_from_path_or_working_directory(module_spec)
    except ImportError as error:
        raise ValueError(f"reward_fn {spec!r}: cannot import module {module_spec!r} "
                         f"({error})") from error
    except Exception as error:
        raise ValueError(f"reward_fn {spec!r}: importing {module_spec!r} failed: "
                         f"{type(error).__name__}: {error}") from error


def _import_from_path_or_working_directory(name: str):
    """Import ``name``; if its top-level package is nowhere on ``sys.path``, look in the working
    directory too. ``python -m`` puts it on the path but the ``fastalign`` console script does
    not, and ``--reward-fn my_rewards:score`` next to ``my_rewards.py`` should work from both."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        top = name.split(".")[0]
        cwd = os.getcwd()
        if error.name != top or cwd in sys.path or "" in sys.path:
            raise
    # Kept on the path (not removed after the import): the module may import its neighbours
    # lazily, when the reward is first computed.
    sys.path.append(cwd)
    return importlib.import_module(name)


def resolve_reward_fn(spec: str | RewardFn) -> RewardFn:
    """The reward function a spec names.

    Args:
        spec: a builtin name (``"polite"``, ``"length"``), ``"module:function"`` (a module on
            ``sys.path`` or in the working directory), ``"path/to/file.py:function"``
            (``function`` may be dotted: ``"mod:Class.method"``), or a callable (returned as is).

    Raises:
        ValueError: an unknown name, a module that cannot be imported, a missing attribute or one
            that is not callable; the message says which and lists the builtins.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward_fn must be a builtin name, 'module:function' or a callable, got "
                        f"{type(spec).__name__}")
    builtins = ", ".join(map(repr, BUILTIN_REWARDS))
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_spec, colon, attribute = spec.rpartition(":")
    if not colon or not module_spec or not attribute:
        raise ValueError(f"reward_fn must be a builtin ({builtins}) or 'package.module:function' "
                         f"or 'file.py:function', got {spec!r}")
    target = _load_module(module_spec, spec)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward_fn {spec!r}: {module_spec!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward_fn {spec!r}: {attribute!r} is a {type(target).__name__}, not a "
                         f"function fn(prompts, completions, **kwargs) -> list[float]")
    return target


def _reward_specs(spec) -> list:
    """The entries of a ``reward_fn`` value: a comma-separated string, a callable, or a list of
    names and callables (names in a list may not hold commas)."""
    if isinstance(spec, str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
    elif callable(spec):
        entries = [spec]
    elif isinstance(spec, (list, tuple)):
        entries = list(spec)
    else:
        raise TypeError(f"reward_fn must be a name, 'module:function', a callable or a list of "
                        f"them, got {type(spec).__name__}")
    if not entries:
        raise ValueError(f"reward_fn names no function: {spec!r}")
    return entries


def _check_reward_weights(weights, count: int) -> tuple[float, ...]:
    """``reward_weights`` as floats, one per reward function (None: 1 each)."""
    if weights is None:
        return (1.0,) * count
    if not isinstance(weights, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
            for w in weights):
        raise ValueError(f"reward_weights must be finite numbers, one per reward function, got "
                         f"{weights!r}")
    if len(weights) != count:
        raise ValueError(f"reward_weights has {len(weights)} weights for {count} reward "
                         f"function{'s' if count != 1 else ''} of reward_fn: give one weight per "
                         f"function")
    return tuple(float(w) for w in weights)


_EVERYTHING = object()  # how a function with **kwargs is called: with every argument


class RewardFunctions:
    """Several reward functions and their weights: the reward of a completion is the weighted sum
    of their scores (None scores left out).

    Args:
        spec: what ``reward_fn`` takes (see :func:`_reward_specs`); names are resolved by
            :func:`resolve_reward_fn`.
        weights: one finite weight per function (default: 1 each).
    """

    def __init__(self, spec, weights: Sequence[float] | None = None) -> None:
        entries = _reward_specs(spec)
        self.functions = [resolve_reward_fn(entry) for entry in entries]
        self.weights = _check_reward_weights(weights, len(self.functions))
        self.names = _unique_names([entry if isinstance(entry, str) and entry in BUILTIN_REWARDS
                                    else _function_name(fn)
                                    for entry, fn in zip(entries, self.functions)])
        self._parameters = [_keyword_parameters(fn) for fn in self.functions]

    def __len__(self) -> int:
        return len(self.functions)

    def __call__(self, *, prompts: list, completions: list, completion_ids: list[list[int]],
                 columns: dict[str, list], trainer_state: TrainingProgress
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [N], scores [N, F]) as float32 on the CPU; ``scores`` holds NaN where a
        function returned None, ``rewards`` is their weighted sum without those."""
        arguments = {**columns, "prompts": prompts, "completions": completions,
                     "completion_ids": completion_ids, "trainer_state": trainer_state}
        scores = torch.stack([
            self._scores(fn, name, parameters, arguments, len(completions))
            for fn, name, parameters in zip(self.functions, self.names, self._parameters)], 1)
        missing = scores.isnan().all(1)
        if bool(missing.any()):
            row = int(missing.nonzero()[0, 0])
            warnings.warn(f"every reward function returned None for completion {row} "
                          f"({completion_text(completions[row])!r:.80}): its weighted sum is 0; "
                          f"the online trainers give it no advantage and leave it out of its "
                          f"group's baseline", stacklevel=2)
        weights = torch.tensor(self.weights, dtype=torch.float32)
        return (scores * weights).nansum(1), scores

    def metrics(self, scores: torch.Tensor) -> dict[str, float]:
        """TRL's per-function metrics of ``scores`` [N, F]: ``rewards/{name}/mean`` and
        ``/std``, None scores left out (a function with none in ``scores`` gets no entry)."""
        metrics = {}
        for name, column in zip(self.names, scores.unbind(1)):
            values = column[~column.isnan()]
            if len(values):
                metrics[f"rewards/{name}/mean"] = float(values.mean())
                metrics[f"rewards/{name}/std"] = float(values.std()) if len(values) > 1 else 0.0
        return metrics

    @staticmethod
    def _scores(fn, name: str, parameters, arguments: dict, count: int) -> torch.Tensor:
        if parameters is _EVERYTHING:
            values = fn(**arguments)
        elif parameters:
            needed = [p for p in parameters if p.name not in arguments
                      and p.default is inspect.Parameter.empty]
            if needed:
                columns = sorted(set(arguments) - {"prompts", "completions", "completion_ids",
                                                   "trainer_state"})
                raise ValueError(f"reward_fn {name} takes {needed[0].name!r}, which the prompt "
                                 f"data has no column for (its columns: {columns or 'none'})")
            values = fn(**{p.name: arguments[p.name] for p in parameters
                           if p.name in arguments})
        else:  # the older convention
            values = fn(arguments["prompts"], arguments["completions"])
        try:
            values = list(values)
            floats = [math.nan if value is None else float(value) for value in values]
        except (TypeError, ValueError):
            raise ValueError(f"reward_fn {name} must return a list of numbers (or None), got "
                             f"{type(values).__name__}") from None
        if len(floats) != count:
            raise ValueError(f"reward_fn {name} returned {len(floats)} scores for {count} "
                             f"completions")
        # NaN counts as None (TRL's nansum); an infinite reward is a bug in the function.
        if any(math.isinf(f) for f in floats):
            raise ValueError(f"reward_fn {name}: the reward is infinite: {floats} (return None "
                             f"where a reward does not apply)")
        return torch.tensor(floats, dtype=torch.float32)


def _function_name(fn) -> str:
    """TRL names a reward function by its ``__name__`` (metrics ``rewards/{name}/mean``)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unique_names(names: list[str]) -> list[str]:
    """One function given twice (say with different ``functools.partial`` arguments) gets its
    position appended, so that its metrics stay apart."""
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _keyword_parameters(fn):
    """How to call ``fn``: ``_EVERYTHING`` (it takes ``**kwargs``), the parameters it names that
    the convention can fill, or an empty list (none: called as ``fn(prompts, completions)``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and extension functions have none
        return []
    parameters = list(signature.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return _EVERYTHING
    named = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)]
    known = {"prompts", "completions", "completion_ids", "trainer_state"}
    return named if any(p.name in known for p in named) else []
