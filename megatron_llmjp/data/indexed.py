"""Training data from megatron indexed datasets through megatron-core's dataset builders.

A mixture stage (``data/mixture.py``) becomes a ``BlendedDataset`` of ``GPTDataset``s built by
``BlendedMegatronDatasetBuilder``: megatron-core decides document order, sample boundaries and
the blend, deterministically for the seed, the split and the number of samples. Each rank
builds the same datasets (rank 0 first, writing the index cache; the others then read it) and
takes its rows of each global batch, so the data order does not depend on the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llmjp.config.mixture_file import Mixture, Stage
from megatron_llmjp.data.batches import SampleCursor, rank_rows
from megatron_llmjp.data.mixture import natural_tokens, shares


@dataclass(frozen=True)
class TokenIds:
    """What megatron-core's GPT dataset needs of a tokenizer: ids only."""

    eod: int
    pad: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of the dataset cache key (megatron-core serialises it into the cache name)."""
        return {"class": "TokenIds", "eod": self.eod, "pad": self.pad, "vocab": self.vocab_size}


class DatasetBatches(SampleCursor):
    """Global batches of consecutive samples of a megatron dataset, resumable by sample index."""

    def __init__(self, dataset, global_batch_size: int):
        super().__init__(global_batch_size)
        self.dataset = dataset

    def microbatches(
        self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[dict]:
        first = self.first_sample(step)
        if first < 0 or first + self.global_batch_size > len(self.dataset):
            raise IndexError(
                f"step {step} needs samples [{first}, {first + self.global_batch_size}) but the "
                f"dataset holds {len(self.dataset)} (built for fewer iterations?)"
            )
        rows = rank_rows(self.global_batch_size, dp_rank, dp_size, micro_batch_size)
        out = []
        for start in range(rows.start, rows.stop, micro_batch_size):
            samples = [self.dataset[first + i] for i in range(start, start + micro_batch_size)]
            out.append(
                {
                    key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                    for key in ("tokens", "labels", "loss_mask", "position_ids")
                }
            )
        for mb in out:
            mb["loss_mask"] = mb["loss_mask"].float()
        return out


def build_blend(
    mixture: Mixture,
    stage: Stage,
    *,
    seed: int,
    seq_length: int,
    split: str,
    token_ids: TokenIds,
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
    build_here_first: bool,
):
    """(train, valid) megatron datasets for ``stage``; collective when a process group exists.

    ``build_here_first``: this rank builds (and caches) before the others, which then read the
    cache after a barrier."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    natural = {m.name: natural_tokens(mixture.sources[m.name]) for m in stage.mix}
    weights = shares(stage, natural)
    names = [m.name for m in stage.mix if weights[m.name] > 0]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([mixture.sources[n] for n in names], [weights[n] for n in names]),
        split=split,
        tokenizer=token_ids,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache_dir),
        mmap_bin_files=True,
    )
    sizes = [train_samples, valid_samples, 0]
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    if dist:
        datasets = build() if build_here_first else None
        torch.distributed.barrier()
        if datasets is None:
            datasets = build()
    else:
        datasets = build()
    train, valid, _ = datasets
    return train, (valid if valid_samples else None)


def samples_for(tokens: int, seq_length: int) -> int:
    return math.ceil(tokens / seq_length)
