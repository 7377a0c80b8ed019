"""Parity check: the HF model and the megatron-core checkpoint must compute the same function.

Both sides run in FP32 (BF16 weights upcast exactly) on the same batch of real text tokenised
with the LLM-jp-4 tokenizer, so the only differences left are kernel rounding: a mapping
mistake (a transposed QKV group, a swapped gate/up, a wrong expert) shows as O(1) logit
differences and top-1 disagreement. transformers must load the directory with no missing,
unexpected or mismatched tensors. The megatron side runs in this process in a single-rank
gloo group that is torn down afterwards.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from megatron_llmjp.convert.transforms import ConversionError, ParityError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = (
    "corpus/ja-jnli-v1.1-train.txt",
    "corpus/en-tinyshakespeare.txt",
)
# Max |logit difference| relative to max(1, max |logit|), and the share of positions whose
# top-1 token must agree. Both sides run in FP32.
MAX_REL_DIFF = 1e-3
MIN_TOP1 = 0.99


def _shared_data() -> Path:
    return REPO.parent / "shared" / "data"


def _tokenizer_path(ckpt_config: dict) -> Path:
    configured = ckpt_config.get("data", {}).get("tokenizer")
    candidates = [Path(configured)] if configured else []
    candidates.append(_shared_data() / "tokenizer" / "llm-jp-tokenizer-v4.0")
    for c in candidates:
        if str(c) and c.exists():
            return c
    raise ConversionError(
        "parity check: no tokenizer found (checkpoint's data.tokenizer and "
        f"{candidates[-1]}); pass --parity-tokenizer or --skip-parity"
    )


def parity_batch(
    vocab_size: int, tokenizer: Path, text: list[str] | None, batch: int = 2, seq: int = 64
) -> torch.Tensor:
    """``batch`` rows of ``seq`` token ids of real Japanese and English text. Ids beyond a
    small test model's vocabulary are folded into it (the check is about the function)."""
    from megatron_llmjp.data.tokenizer import Tokenizer

    if text is None:
        files = [_shared_data() / f for f in DEFAULT_TEXT]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"parity check: text files missing: {missing}; --skip-parity")
        text = [f.read_text(encoding="utf-8", errors="replace")[:20000] for f in files]
    tok = Tokenizer.from_path(tokenizer)
    rows = []
    for i in range(batch):
        ids = tok.encode(text[i % len(text)])[i * seq : (i + 1) * seq + seq]
        if len(ids) < seq:
            raise ConversionError(f"parity check: text {i} is shorter than {seq} tokens")
        rows.append(torch.tensor(ids[:seq]) % vocab_size)
    return torch.stack(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(ckpt_dir: Path, manifest: dict, overrides: list[str]):
    """The checkpoint's run config (its ``config.yaml``, or for a Megatron-LM checkpoint the
    defaults with the model derived from its args) with ``overrides``."""
    from dataclasses import replace

    from megatron_llmjp.checkpoint import megatron_lm
    from megatron_llmjp.config.loader import build_config

    if (ckpt_dir / "config.yaml").is_file():
        return build_config(ckpt_dir / "config.yaml", overrides)
    cfg = build_config(None, [*megatron_lm.model_overrides(manifest), *overrides])
    return replace(cfg, model=megatron_lm.model_from_manifest(manifest))


def megatron_logits(
    ckpt_dir: Path, tokens: torch.Tensor, manifest: dict | None = None
) -> torch.Tensor:
    """Logits [batch, seq, true vocabulary] of the checkpoint's model on one process, in
    FP32. ``manifest``: the checkpoint's description (read from ``ckpt_dir`` when None;
    required for a Megatron-LM checkpoint whose args lack the vocabulary)."""
    from megatron_llmjp.checkpoint.manifest import describe_checkpoint
    from megatron_llmjp.checkpoint.state import ResumePlan, load_checkpoint
    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.parallel import cpu_compat
    from megatron_llmjp.parallel.dist import (
        RankInfo,
        destroy_distributed,
        init_distributed,
        seed_everything,
    )
    from megatron_llmjp.parallel.layout import make_layout

    cpu_compat.install()
    b, s = tokens.shape
    overrides = [
        *(f"parallel.{k}=1" for k in ("tp", "pp", "cp", "ep")),
        "parallel.vpp=null",
        "parallel.etp=null",
        "parallel.sequence_parallel=null",
        "precision.dtype=fp32",
        "precision.fp8=null",
        f"train.seq_length={s}",
        f"train.micro_batch_size={b}",
        f"train.global_batch_size={b}",
        "checkpoint.dir=null",
        "checkpoint.load=null",
        "checkpoint.interval=0",
        "checkpoint.async_save=false",
    ]
    if manifest is None:
        manifest = describe_checkpoint(ckpt_dir, verify=False)
    cfg = _run_config(ckpt_dir, manifest, overrides)
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    init_distributed(RankInfo(0, 0, 1, "single"), layout, 5.0)
    try:
        seed_everything(cfg.train.seed)
        (chunk,) = build_model_chunks(cfg, layout)

        class _Unwrapped:  # load_checkpoint expects DDP-wrapped chunks (``.module``)
            module = chunk

        plan = ResumePlan(ckpt_dir, manifest, False, "parity check")
        load_checkpoint([_Unwrapped()], None, cfg, layout, plan)
        chunk.eval()
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            logits = chunk(tokens, position_ids, attention_mask=None)
        return logits[..., : cfg.model.vocab_size].float().contiguous()
    finally:
        destroy_distributed()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the HF model; refuses any missing, unexpected or mismatched tensor."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"parity check: transformers loaded {hf_dir} with {info}")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def check_parity(
    hf_dir: Path,
    ckpt_dir: Path,
    *,
    text: list[str] | None = None,
    tokenizer: Path | None = None,
    manifest: dict | None = None,
) -> dict:
    """Compare logits; raises ``ConversionError`` with the figures unless they agree.
    ``manifest``: the checkpoint's description (needed for a Megatron-LM checkpoint)."""
    import yaml

    path = Path(ckpt_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    vocab = manifest["model"]["vocab_size"] if manifest else config["model"]["vocab_size"]
    tokens = parity_batch(vocab, Path(tokenizer) if tokenizer else _tokenizer_path(config), text)
    ref = megatron_logits(Path(ckpt_dir), tokens, manifest)
    got = hf_logits(Path(hf_dir), tokens)
    if ref.shape != got.shape:
        raise ConversionError(f"parity check: logits shapes differ: {ref.shape} vs {got.shape}")
    peak = ref.abs().max().item()
    scale = max(1.0, peak)
    max_diff = (ref - got).abs().max().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    result = {
        "tokens": list(tokens.shape),
        "max_abs_diff": max_diff,
        "max_abs_logit": peak,
        "rel_diff": max_diff / scale,
        "top1_agreement": top1,
        "thresholds": {"rel_diff": MAX_REL_DIFF, "top1_agreement": MIN_TOP1},
    }
    result["passed"] = result["rel_diff"] <= MAX_REL_DIFF and top1 >= MIN_TOP1
    print(
        f"[convert] parity on {tokens.shape[0]}x{tokens.shape[1]} tokens: max |dlogit| "
        f"{max_diff:.3g} (max |logit| {peak:.3g}, rel {max_diff / scale:.2g} <= "
        f"{MAX_REL_DIFF}), top-1 agreement {top1:.4f} >= {MIN_TOP1}: "
        f"{'passed' if result['passed'] else 'FAILED'}",
        flush=True,
    )
    if not result["passed"]:
        raise ParityError(f"parity check failed: {result}")
    return result
