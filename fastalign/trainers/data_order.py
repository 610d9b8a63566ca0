"""The order in which a trainer takes its examples, reproducible across an interruption.

Each epoch is a permutation of the examples drawn from a generator seeded by ``(seed, epoch)``;
the stream's whole state is two integers, so a resumed run takes exactly the micro-batches the
uninterrupted run would have taken, none lost or repeated.
"""

from __future__ import annotations

import torch

__all__ = ["BatchStream"]


class BatchStream:
    """Endless micro-batches of example indices: a fresh seeded permutation every epoch.

    The state (``epoch``, ``position`` in the epoch's permutation) is all a resumed run needs to
    continue with exactly the next micro-batch. The last micro-batch of an epoch may be smaller,
    unless ``drop_last`` (KTO needs full batches: its KL pairs need two examples).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, *, shuffle: bool = True,
                 drop_last: bool = False):
        if num_examples < 1:
            raise ValueError("the training data has no examples")
        if drop_last and num_examples < batch_size:
            raise ValueError(f"the training data has {num_examples} examples, fewer than one "
                             f"batch of {batch_size}")
        self.num_examples, self.batch_size = num_examples, batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches in one pass (a smaller last one counts, unless ``drop_last``)."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def epochs_done(self) -> float:
        """Passes over the data so far, fractional: the examples drawn over the dataset size
        (1.5: half of the second epoch drawn; with ``drop_last`` an epoch ends a little short of
        a whole number, its last examples skipped)."""
        return self.epoch + self.position / self.num_examples

    def next(self) -> list[int]:
        left = self.num_examples - self.position
        if left <= 0 or (self.drop_last and left < self.batch_size):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        indices = self._order[self.position:self.position + self.batch_size]
        self.position += len(indices)
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
