"""The training batch stream with a position that checkpoints can store and restore.

Micro-batches come from `megatron_ext.data.packing.iterate_batches`, whose order is a pure
function of (seed, epoch, data-parallel rank). The position is (epoch, micro-batches consumed
in that epoch); restoring it rebuilds the epoch's order and skips what was consumed, so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BatchStream:
    """Endless micro-batches of one data-parallel rank, epoch after epoch."""

    def __init__(self, packed, micro_batch_size: int, *, seed: int, dp_rank: int, dp_size: int
                 ) -> None:
        self.packed, self.micro_batch_size = packed, micro_batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.epoch, self.index = 0, 0
        self._it: Iterator[dict] | None = None

    def _epoch_iter(self) -> Iterator[dict]:
        from megatron_ext.data.packing import iterate_batches

        return iterate_batches(self.packed, self.micro_batch_size, seed=self.seed,
                               rank=self.dp_rank, world_size=self.dp_size, epoch=self.epoch)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = self._epoch_iter()
                for _ in range(self.index):
                    next(self._it)
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            if self.index == 0:
                break
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
        raise ValueError(
            f"{len(self.packed)} packed sequences cannot fill one micro-batch of "
            f"{self.micro_batch_size} on each of {self.dp_size} data-parallel ranks; lower "
            "train.micro_batch_size or data.seq_length, or use more documents")

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None


def truncate(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The first `length` tokens of every row (sequence-length warm-up).

    The last kept token's label points past the cut but is still the true next token, so the
    rows stay valid training examples.
    """
    if length >= batch["tokens"].shape[1]:
        return batch
    return {k: v[:, :length] for k, v in batch.items()}


__all__ = ["BatchStream", "truncate"]
