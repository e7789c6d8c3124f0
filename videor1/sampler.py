"""Which dataset rows each rank reads, in a seeded order that a checkpoint can resume exactly."""

from __future__ import annotations

import torch


class PromptSampler:
    """Every epoch, a seeded permutation of all rows; rank r takes items r, r + world, r + 2*world, ...

    The state is (epoch, position): `state_dict()` after a step and `load_state_dict()` on resume give
    the same next rows. When a rank runs past its share, the next epoch begins (for that rank).
    """

    def __init__(self, num_rows: int, seed: int, rank: int, world_size: int, shuffle: bool = True):
        if num_rows < world_size:
            raise ValueError(f"dataset has {num_rows} rows, fewer than the {world_size} ranks")
        self.num_rows, self.seed, self.rank, self.world_size, self.shuffle = num_rows, seed, rank, world_size, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            perm = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            perm = list(range(self.num_rows))
        usable = self.num_rows - self.num_rows % self.world_size  # equal shares per rank
        return perm[self.rank:usable:self.world_size]

    def next(self) -> int:
        """The next row index for this rank."""
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order()
        index = self._order[self.position]
        self.position += 1
        return index

    @property
    def rows_per_epoch(self) -> int:
        return len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order()
