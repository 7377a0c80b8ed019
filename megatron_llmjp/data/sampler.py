"""The trainer's view of the data: this rank's microbatches for an optimizer step."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.data.text import GlobalBatchSampler, load_token_stream, synthetic_token_stream


@dataclass
class RankSampler:
    """Binds a layout-independent ``GlobalBatchSampler`` to one data-parallel rank."""

    sampler: GlobalBatchSampler
    dp_rank: int
    dp_size: int
    micro_batch_size: int

    def microbatches(self, step: int) -> list[dict]:
        return self.sampler.microbatches(step, self.dp_rank, self.dp_size, self.micro_batch_size)


def build_sampler(cfg: RunConfig, dp_rank: int, dp_size: int) -> RankSampler:
    t, d = cfg.train, cfg.data
    seed = t.seed if d.seed is None else d.seed
    if d.synthetic:
        n = max(4 * t.global_batch_size * (t.seq_length + 1), 1 << 16)
        tokens = synthetic_token_stream(n, cfg.model.vocab_size, seed)
    else:
        from megatron_llmjp.data.tokenizer import Tokenizer

        tok = Tokenizer.from_path(d.tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"data.tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}"
            )
        tokens = load_token_stream(d.text_files, tok, d.max_bytes_per_file)
    sampler = GlobalBatchSampler(tokens, t.seq_length, t.global_batch_size, seed)
    return RankSampler(sampler, dp_rank, dp_size, t.micro_batch_size)
