"""Training checkpoints that survive a kill at any moment.

A checkpoint is one directory ``<output>/checkpoints/step-000120/`` holding ``state.pt`` (model,
optimizer, scheduler, random-number generators, data position, trainer extras) and
``manifest.json`` (the step, and the size and SHA-256 of ``state.pt``).

Atomicity: everything is written into a hidden ``.tmp-step-000120`` directory, flushed to disk
(fsync), and only then renamed to ``step-000120``; a rename within a directory is atomic on POSIX
file systems, so a reader sees either no checkpoint or a complete one. A checkpoint that is
nevertheless damaged on disk (truncated, edited) fails its manifest check; ``load_latest`` then
warns, names what is wrong, and falls back to the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "checkpoint_dirs", "load_latest", "save_checkpoint"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = "state.pt"
_MANIFEST_FILE = "manifest.json"


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
    try:
        return torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001  (any unpickling failure means unusable)
        raise CheckpointError(f"checkpoint {path}: cannot load {_STATE_FILE} ({error})") from None


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
