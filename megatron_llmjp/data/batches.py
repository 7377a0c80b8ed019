"""What every global-batch source shares: its position in the run's sample order, and which
rows of a global batch belong to a data-parallel rank."""

from __future__ import annotations


class SampleCursor:
    """Maps optimizer steps to sample indices; movable when a run resumes.

    The sample order is a function of the sample index only, so a resumed run sees exactly
    the samples an uninterrupted one would, even if ``global_batch_size`` changed."""

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = int(global_batch_size)
        self._base_step = 0
        self._base_samples = 0

    def resume_at(self, step: int, consumed_samples: int) -> None:
        """Continue a run: optimizer step ``step`` starts at sample ``consumed_samples``."""
        self._base_step, self._base_samples = int(step), int(consumed_samples)

    def first_sample(self, step: int) -> int:
        """Index of the first sample of ``step`` in the run's sample order."""
        return self._base_samples + (step - self._base_step) * self.global_batch_size


def rank_rows(global_batch_size: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> range:
    """Rows of the global batch owned by ``dp_rank``: a contiguous block that splits evenly
    into microbatches."""
    gbs = global_batch_size
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank=}, {dp_size=}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if gbs % dp_size:
        raise ValueError(
            f"train.global_batch_size={gbs} is not divisible by the data-parallel size {dp_size}"
        )
    per_rank = gbs // dp_size
    if per_rank % micro_batch_size:
        raise ValueError(
            f"per-rank batch {per_rank} (train.global_batch_size={gbs} / dp={dp_size}) is "
            f"not divisible by train.micro_batch_size={micro_batch_size}"
        )
    return range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
