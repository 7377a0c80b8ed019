"""The trainer's view of the data: this rank's microbatches for an optimizer step.

Three sources, one interface (``microbatches(step)`` and ``resume_at(step, samples)``):
megatron indexed datasets blended by a mixture stage (``data.mixture``), plain text files
tokenised on the fly (``data.text_files``), or synthetic tokens (``data.synthetic``). All are
indexed by the sample position in the run, never by rank, so the order is layout-independent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.data.text import GlobalBatchSampler, load_token_stream, synthetic_token_stream


@dataclass
class RankSampler:
    """Binds a layout-independent global-batch source to one data-parallel rank."""

    sampler: object
    dp_rank: int
    dp_size: int
    micro_batch_size: int

    def microbatches(self, step: int) -> list[dict]:
        return self.sampler.microbatches(step, self.dp_rank, self.dp_size, self.micro_batch_size)

    def resume_at(self, step: int, consumed_samples: int) -> None:
        self.sampler.resume_at(step, consumed_samples)


@dataclass
class Data:
    train: RankSampler
    valid: RankSampler | None = None
    stage: str | None = None


def build_data(
    cfg: RunConfig,
    dp_rank: int,
    dp_size: int,
    stage_start: int = 0,
    *,
    iteration: int | None = None,
    stage_consumed: int = 0,
) -> Data:
    """Train (and valid) batches; ``stage_start`` is the iteration the data stage began at.

    A resumed run passes its ``iteration`` and the samples the stage has already consumed
    (``stage_consumed``): a mixture stage then holds ``stage_consumed + (train.iters -
    iteration) x train.global_batch_size`` samples, so a resume with another global batch size
    finds every sample it needs. Without ``iteration`` the stage starts at ``stage_start``."""
    t, d = cfg.train, cfg.data
    seed = t.seed if d.seed is None else d.seed
    if d.mixture is not None:
        if iteration is None:
            iteration, stage_consumed = stage_start, 0
        needed = stage_samples(t.iters, t.global_batch_size, iteration, stage_consumed)
        return _mixture_data(cfg, dp_rank, dp_size, stage_start, seed, needed)
    if d.synthetic:
        n = max(4 * t.global_batch_size * (t.seq_length + 1), 1 << 16)
        tokens = synthetic_token_stream(n, cfg.model.vocab_size, seed)
    else:
        tokens = load_token_stream(d.text_files, _tokenizer(cfg), d.max_bytes_per_file)
    sampler = GlobalBatchSampler(tokens, t.seq_length, t.global_batch_size, seed)
    return Data(RankSampler(sampler, dp_rank, dp_size, t.micro_batch_size))


def _tokenizer(cfg: RunConfig):
    from megatron_llmjp.data.tokenizer import Tokenizer

    tok = Tokenizer.from_path(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data.tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}"
        )
    return tok


def _mixture_token_ids(cfg: RunConfig):
    """EOD, padding id and vocabulary of the indexed datasets (megatron-core's GPTDataset
    masks the loss where the label is the padding id)."""
    from megatron_llmjp.data.indexed import TokenIds

    n = cfg.data.null_tokenizer_vocab_size
    if n is not None:
        # megatron-core's NullTokenizer: EOD = n; no padding id, so nothing is masked (-1).
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        null = NullTokenizer(n)
        return TokenIds(null.eod, -1, null.vocab_size)
    tok = _tokenizer(cfg)
    return TokenIds(tok.eod_id, tok.pad_id, tok.vocab_size)


def stage_samples(iters: int, global_batch_size: int, iteration: int, consumed: int) -> int:
    """Samples a data stage must hold to reach ``iters``: the ``consumed`` ones read before
    ``iteration`` plus ``global_batch_size`` for each step left."""
    return int(consumed) + max(int(iters) - int(iteration), 0) * int(global_batch_size)


def _mixture_data(
    cfg: RunConfig, dp_rank: int, dp_size: int, stage_start: int, seed: int, needed: int
):
    import torch

    from megatron_llmjp.config.mixture_file import load_mixture
    from megatron_llmjp.data.indexed import DatasetBatches, build_blend, samples_for

    t, d = cfg.train, cfg.data
    mixture = load_mixture(d.mixture)
    stage = mixture.stage(d.stage)
    if stage.tokens is not None:
        train_samples = samples_for(stage.tokens, t.seq_length)
        if needed > train_samples:
            raise ConfigError(
                f"{d.mixture}: stage {stage.name} budget of {stage.tokens} tokens is "
                f"{train_samples} samples of {t.seq_length} tokens, but train.iters={t.iters} "
                f"(stage from iteration {stage_start}, global batch {t.global_batch_size}) "
                f"needs {needed}"
            )
    else:
        train_samples = max(needed, t.global_batch_size)  # megatron-core needs a sample
    token_ids = _mixture_token_ids(cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    cache = Path(d.cache_dir) if d.cache_dir else Path(cfg.output_dir) / "dataset_cache"
    if rank == 0:
        cache.mkdir(parents=True, exist_ok=True)
    train, valid = build_blend(
        mixture,
        stage,
        seed=seed,
        seq_length=t.seq_length,
        split=d.split,
        token_ids=token_ids,
        train_samples=train_samples,
        valid_samples=t.eval_iters * t.global_batch_size if t.eval_interval else 0,
        cache_dir=cache,
        build_here_first=rank == 0,
    )
    mbs = t.micro_batch_size
    gbs = t.global_batch_size
    train_batches = RankSampler(DatasetBatches(train, gbs), dp_rank, dp_size, mbs)
    train_batches.resume_at(stage_start, 0)  # the stage's first step reads its first sample
    valid_batches = None
    if valid is not None:
        valid_batches = RankSampler(DatasetBatches(valid, gbs), dp_rank, dp_size, mbs)
    return Data(train_batches, valid_batches, stage.name)
