"""Reward functions for the online trainers (PPO, GRPO, RLOO), and how a name becomes one.

A reward function scores decoded text: ``fn(prompts: list[str], completions: list[str]) ->
list[float]``, one finite score per (prompt, completion) pair, higher is better. The trainers call
it once per rollout on the whole batch (the ``num_generations`` completions of a prompt are
consecutive, each with its own copy of the prompt).

Builtins, chosen by name (``PPOConfig.reward_fn`` / ``--reward-fn``):

* ``"polite"`` (the default, made for the shipped ``prompts.jsonl``): the shipped preference data
  answers each prompt politely (chosen) or rudely (rejected). A completion scores +1 for every
  word of :data:`POLITE_WORDS` (words of the chosen answers that no rejected answer uses, such as
  "sure", "glad", "step") and −1 for every word of :data:`RUDE_WORDS` (words only the rejected
  answers use, such as "whatever", "ugh", "boring"), divided by the number of words of the
  completion: a score in [−1, 1], 0 for an empty completion.
* ``"length"``: prefers completions of about :data:`LENGTH_TARGET` characters (the typical length
  of a shipped answer): ``max(−1, 1 − |characters − target| / target)``, 1 at the target.

Anything else is ``"package.module:function"`` (imported) or ``"path/to/file.py:function"``
(loaded from the file); :func:`resolve_reward_fn` turns a spec into the callable.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["BUILTIN_REWARDS", "LENGTH_TARGET", "POLITE_WORDS", "RUDE_WORDS", "RewardFn",
           "length_reward", "polite_reward", "resolve_reward_fn"]

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

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


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def polite_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """(polite words − rude words) / words of each completion, in [−1, 1]; see the module doc."""
    del prompts  # the score depends on the answer only
    scores = []
    for completion in completions:
        words = _words(completion)
        polite = sum(word in POLITE_WORDS for word in words)
        rude = sum(word in RUDE_WORDS for word in words)
        scores.append((polite - rude) / max(len(words), 1))
    return scores


def length_reward(prompts: list[str], completions: list[str], *,
                  target: int = LENGTH_TARGET) -> list[float]:
    """``max(−1, 1 − |len(completion.strip()) − target| / target)``: 1 at ``target`` characters."""
    del prompts
    if not isinstance(target, int) or target < 1:
        raise ValueError(f"target must be a positive int, got {target!r}")
    return [max(-1.0, 1.0 - abs(len(c.strip()) - target) / target) for c in completions]


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
        return importlib.import_module(module_spec)
    except ImportError as error:
        raise ValueError(f"reward_fn {spec!r}: cannot import module {module_spec!r} "
                         f"({error})") from error


def resolve_reward_fn(spec: str | RewardFn) -> RewardFn:
    """The reward function a spec names.

    Args:
        spec: a builtin name (``"polite"``, ``"length"``), ``"package.module:function"``,
            ``"path/to/file.py:function"`` (``function`` may be dotted: ``"mod:Class.method"``),
            or a callable (returned as is).

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
                         f"function fn(prompts, completions) -> list[float]")
    return target
