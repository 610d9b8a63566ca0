"""Feedback hooks: a person (or any program) ranks the candidates of online DPO.

A hook is a callable ``rank(prompt, candidates) -> ranking``: ``prompt`` is the data's prompt (a
string, or a list of chat messages), ``candidates`` the completion texts, and ``ranking`` the
candidate indices (from 0) best first, each exactly once (no ties: DPO needs a strict order). A
hook that also takes a ``step`` keyword is told the training step (0-based) it is asked for.

Two are ready made: :class:`TerminalFeedback` asks on the terminal, :class:`JSONLQueueFeedback`
through two JSONL files, so that another process, or a person with an editor, answers at its own
pace. ``OnlineDPOTrainer`` checks every ranking with :func:`check_ranking` and logs each one it
receives (``feedback_log.jsonl``), so that a resumed run replays them instead of asking again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fastalign.trainers.reward_functions import completion_text, resolve_reward_fn

__all__ = ["BUILTIN_FEEDBACK", "FeedbackError", "FeedbackFn", "FeedbackLog", "JSONLQueueFeedback",
           "TerminalFeedback", "ask", "check_ranking", "feedback_key", "resolve_feedback"]

FeedbackFn = Callable[..., Sequence[int]]


class FeedbackError(ValueError):
    """A ranking that cannot be used, or feedback that never came."""


def check_ranking(ranking, count: int, *, source: str = "the feedback hook") -> list[int]:
    """``ranking`` as a list of ints, checked to order all ``count`` candidates (0-based, best
    first, each once); a FeedbackError says what is wrong otherwise."""
    expected = f"a list of the candidate indices 0..{count - 1}, best first, each once"
    try:
        values = list(ranking)
    except TypeError:
        raise FeedbackError(f"{source} must return {expected}; got {ranking!r}") from None
    if any(isinstance(value, bool) or not isinstance(value, int) for value in values):
        raise FeedbackError(f"{source} must return {expected}; got {values!r} (not all "
                            f"integers)")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise FeedbackError(f"{source} ranked candidate(s) {repeated} more than once in "
                            f"{values!r}: ties are not allowed, give {expected}")
    outside = [value for value in values if not 0 <= value < count]
    if outside:
        raise FeedbackError(f"{source} returned {values!r}: {outside} not among the "
                            f"{count} candidates; give {expected}")
    if len(values) != count:
        missing = sorted(set(range(count)) - set(values))
        raise FeedbackError(f"{source} returned {values!r}, which leaves out candidate(s) "
                            f"{missing}; give {expected}")
    return values


def feedback_key(step: int, prompt, candidates: Sequence[str]) -> str:
    """A stable id of one question: the step, the prompt and the candidates, hashed."""
    text = json.dumps([step, prompt, list(candidates)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def ask(hook: FeedbackFn, prompt, candidates: list[str], *, step: int) -> list[int]:
    """The hook's checked ranking of ``candidates`` (``step`` passed on when it takes it)."""
    try:
        takes_step = "step" in inspect.signature(hook).parameters
    except (TypeError, ValueError):
        takes_step = False
    ranking = hook(prompt, candidates, step=step) if takes_step else hook(prompt, candidates)
    return check_ranking(ranking, len(candidates))


class FeedbackLog:
    """Every ranking received, one JSON line each (``{"key", "step", "ranking"}``), written as it
    arrives: a run resumed from an earlier checkpoint samples the same candidates again and finds
    their rankings here, so nobody is asked the same question twice."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rankings: dict[str, list[int]] = {}

    def load(self) -> None:
        self.rankings = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.rankings[record["key"]] = record["ranking"]

    def reset(self) -> None:
        """Forget every ranking (a fresh run: an earlier run's answers do not apply)."""
        self.rankings = {}
        self.path.unlink(missing_ok=True)

    def get(self, key: str) -> list[int] | None:
        return self.rankings.get(key)

    def add(self, key: str, step: int, ranking: list[int]) -> None:
        self.rankings[key] = ranking
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"key": key, "step": step, "ranking": ranking}) + "\n")
            file.flush()


class TerminalFeedback:
    """Ask on the terminal: print the prompt and the numbered candidates (from 1), read a ranking
    such as ``2 1 3`` (best first; commas allowed), and ask again after a bad answer. The end of
    the input (EOF) is a FeedbackError: there is nobody left to ask."""

    def __init__(self, input_stream=None, output_stream=None) -> None:
        self.input_stream, self.output_stream = input_stream, output_stream

    def __call__(self, prompt, candidates: list[str]) -> list[int]:
        stdin = self.input_stream or sys.stdin  # read at call time: tests and notebooks swap it
        out = self.output_stream or sys.stdout
        print(f"\nPrompt: {completion_text(prompt) if isinstance(prompt, list) else prompt}",
              file=out)
        for number, candidate in enumerate(candidates, 1):
            print(f"  [{number}] {candidate}", file=out)
        count = len(candidates)
        while True:
            print(f"Rank the {count} candidates, best first (e.g. "
                  f"{' '.join(map(str, range(count, 0, -1)))}): ", end="", file=out, flush=True)
            line = stdin.readline()
            if not line:
                raise FeedbackError("TerminalFeedback: the input ended (EOF) before a ranking "
                                    "was given; run interactively, or use another --feedback")
            try:
                numbers = [int(part) for part in line.replace(",", " ").split()]
                return check_ranking([number - 1 for number in numbers], count,
                                     source="the ranking")
            except ValueError as error:  # not numbers, or not an order of the candidates
                message = str(error) if isinstance(error, FeedbackError) else \
                    f"{line.strip()!r} is not a list of numbers"
                print(f"  {message.replace('0..' + str(count - 1), '1..' + str(count))}",
                      file=out)


class JSONLQueueFeedback:
    """Ask through files, for feedback collected asynchronously (another process, a web page, a
    person with an editor).

    Each question is appended to ``requests_path`` as ``{"id", "step", "prompt", "candidates"}``;
    the answer is a line ``{"id", "ranking"}`` (indices from 0, best first) that someone appends to
    ``responses_path``, polled every ``poll_seconds``. ``timeout`` (seconds; None: wait forever)
    bounds the wait. The id hashes the step, prompt and candidates, so a question asked again
    (a restarted run) finds the answer already given.
    """

    def __init__(self, requests_path: str | Path, responses_path: str | Path, *,
                 poll_seconds: float = 1.0, timeout: float | None = None) -> None:
        if poll_seconds <= 0 or (timeout is not None and timeout < 0):
            raise ValueError(f"poll_seconds must be > 0 and timeout >= 0 or None, got "
                             f"{poll_seconds!r} and {timeout!r}")
        self.requests_path, self.responses_path = Path(requests_path), Path(responses_path)
        self.poll_seconds, self.timeout = poll_seconds, timeout

    def __call__(self, prompt, candidates: list[str], *, step: int = 0) -> list[int]:
        request_id = feedback_key(step, prompt, candidates)
        answer = self._response(request_id, len(candidates))
        if answer is not None:
            return answer
        self.requests_path.parent.mkdir(parents=True, exist_ok=True)
        with self.requests_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"id": request_id, "step": step, "prompt": prompt,
                                   "candidates": list(candidates)}, ensure_ascii=False) + "\n")
        started = time.monotonic()
        while True:
            time.sleep(self.poll_seconds)
            answer = self._response(request_id, len(candidates))
            if answer is not None:
                return answer
            if self.timeout is not None and time.monotonic() - started > self.timeout:
                raise FeedbackError(f"JSONLQueueFeedback: no response to request {request_id} "
                                    f"(step {step}) in {self.responses_path} after "
                                    f"{self.timeout:g} s; append a line {{\"id\": "
                                    f"\"{request_id}\", \"ranking\": [...]}} to it")

    def _response(self, request_id: str, count: int) -> list[int] | None:
        if not self.responses_path.is_file():
            return None
        text = self.responses_path.read_text(encoding="utf-8")
        # The last line may still be being written: only complete lines count.
        lines = text.split("\n")[:-1]
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{self.responses_path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise FeedbackError(f"{where}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or "id" not in record or "ranking" not in record:
                raise FeedbackError(f"{where}: expected {{\"id\", \"ranking\"}}, got {line!r}")
            if record["id"] == request_id:
                return check_ranking(record["ranking"], count, source=where)
        return None


def _jsonl_in_output_dir(output_dir: str) -> JSONLQueueFeedback:
    return JSONLQueueFeedback(Path(output_dir) / "feedback_requests.jsonl",
                              Path(output_dir) / "feedback_responses.jsonl")


# Hooks chosen by name (--feedback): each made from the run's output directory.
BUILTIN_FEEDBACK: dict[str, Callable[[str], FeedbackFn]] = {
    "terminal": lambda output_dir: TerminalFeedback(),
    "jsonl": _jsonl_in_output_dir,
}


def resolve_feedback(spec: str | FeedbackFn, output_dir: str = ".") -> FeedbackFn:
    """The hook ``spec`` names: a callable (as is), ``"terminal"``, ``"jsonl"`` (request and
    response files in ``output_dir``), or ``"module:function"`` / ``"file.py:function"`` (a
    class there is instantiated without arguments)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"feedback must be a callable or a name, got {type(spec).__name__}")
    if spec in BUILTIN_FEEDBACK:
        return BUILTIN_FEEDBACK[spec](output_dir)
    if ":" not in spec:
        raise ValueError(f"feedback must be {' or '.join(map(repr, BUILTIN_FEEDBACK))} or "
                         f"'module:function' (rank(prompt, candidates) -> indices best first), "
                         f"got {spec!r}")
    try:
        target = resolve_reward_fn(spec)  # the same import rules as --reward-fn
    except ValueError as error:
        raise ValueError(str(error).replace("reward_fn", "feedback", 1).split(", not a")[0]) \
            from None
    return target() if inspect.isclass(target) else target
