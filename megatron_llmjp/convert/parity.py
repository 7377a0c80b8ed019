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
# Strings SentencePiece encodes through byte fallback or whitespace handling (rare kanji
# outside the vocabulary, emoji with a modifier, tab, newlines, runs of spaces): the exported
# tokenizer must give the same ids on them as on the corpus text.
BYTE_FALLBACK_TEXT = (
    "𠮷野家で𩸽の塩焼きを食べた。",
    "絵文字😀👍🏽もそのまま🇯🇵",
    "列1\t列2\n次の行\n\n空行の後",
    "  two  spaces and a trailing tab\t",
)


def _shared_data() -> Path:
    return REPO.parent / "shared" / "data"


def _tokenizer_path(ckpt_config: dict) -> Path:
    configured = ckpt_config.get("data", {}).get("tokenizer")
    candidates = [Path(configured)] if configured else []
    candidates.append(_shared_data() / "tokenizer" / "llm-jp-tokenizer-v4.0")
    for c in candidates:
        if str(c) and c.exists():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise ConversionError(
        f"parity check: no tokenizer to encode the check text (tried the checkpoint's "
        f"data.tokenizer and the shared LLM-jp-4 one: {tried}); give one (mcore-to-hf "
        "--tokenizer DIR, hf-to-mcore --set data.tokenizer=DIR) or pass --skip-parity"
    )


def _check_text(text: list[str] | None) -> list[str]:
    """The check text: ``text`` or the first 20,000 characters of the default Japanese and
    English corpus files. Raises ``ConversionError`` when the files are missing."""
    if text is not None:
        return text
    files = [_shared_data() / f for f in DEFAULT_TEXT]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConversionError(f"parity check: text files missing: {missing}; --skip-parity")
    return [f.read_text(encoding="utf-8", errors="replace")[:20000] for f in files]


def check_tokenizer(hf_dir: Path, text: list[str] | None = None, seq: int = 64, batch: int = 2):
    """Check the tokenizer shipped in ``hf_dir`` from text; return (token batch, figures).

    Loads ``AutoTokenizer`` from ``hf_dir`` (no remote code) and raises ``ParityError``
    (exit 3) if it fails to load, if its bos/eos/pad ids differ from ``config.json`` (or
    ``generation_config.json``'s bos/pad, or its EOS list lacks ``config.json``'s), if it can
    produce an id >= ``config.json``'s ``vocab_size``, or if its ids differ from the
    SentencePiece ``tokenizer.model`` beside it on any line of the check text or on
    :data:`BYTE_FALLBACK_TEXT` (with and without its default special tokens), or decoding
    differs. The batch: ``batch`` rows of ``seq`` ids [batch, seq] of the check text encoded
    by the shipped tokenizer, as a user of the release gets them."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    gen_path = hf_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
    vocab = config["vocab_size"]
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a broken directory
        raise ParityError(f"parity check: AutoTokenizer cannot load {hf_dir}: {e}") from e
    problems = []
    if len(tok) > vocab:
        problems.append(f"the tokenizer has {len(tok)} ids, config.json vocab_size {vocab}")
    for role in ("bos", "eos", "pad"):
        got, want = getattr(tok, f"{role}_token_id"), config.get(f"{role}_token_id")
        if got != want:
            problems.append(f"{role}: tokenizer id {got}, config.json {want}")
        if role != "eos" and gen and gen.get(f"{role}_token_id") != want:
            problems.append(f"{role}: generation_config.json {gen.get(f'{role}_token_id')}")
    eos_list = gen.get("eos_token_id")
    if gen and config.get("eos_token_id") not in (
        eos_list if isinstance(eos_list, list) else [eos_list]
    ):
        problems.append(f"generation_config.json eos_token_id {eos_list} lacks config.json's")
    texts = _check_text(text)
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()] + list(BYTE_FALLBACK_TEXT)
    plain = tok(lines, add_special_tokens=False)["input_ids"]
    default = tok(lines)["input_ids"]
    bos = [tok.bos_token_id] if default and default[0][:1] == [tok.bos_token_id] else []
    out_of_range = sorted({i for ids in default for i in ids if i >= vocab})
    if out_of_range:
        problems.append(f"ids >= vocab_size {vocab}: {out_of_range[:5]}")
    sp_file = hf_dir / "tokenizer.model"
    differ = 0
    if sp_file.is_file():
        sp = spm.SentencePieceProcessor(model_file=str(sp_file))
        expected = sp.encode(lines)
        for line, a, b, d in zip(lines, plain, expected, default, strict=True):
            if a != b or d != bos + b or tok.decode(a) != sp.decode(b):
                if not differ:
                    problems.append(
                        f"ids differ from SentencePiece's on {line[:40]!r}: {a[:12]} vs {b[:12]}"
                    )
                differ += 1
        if differ:
            problems.append(f"{differ} of {len(lines)} check lines differ")
    if problems:
        raise ParityError(f"parity check: the shipped tokenizer is wrong: {'; '.join(problems)}")
    rows = []
    for i in range(batch):
        ids = tok(texts[i % len(texts)])["input_ids"][i * seq : (i + 1) * seq + seq]
        if len(ids) < seq:
            raise ConversionError(f"parity check: text {i} is shorter than {seq} tokens")
        rows.append(torch.tensor(ids[:seq]))
    figures = {
        "lines": len(lines),
        "sentencepiece_reference": sp_file.is_file(),
        "adds_bos": bool(bos),
        "vocab": len(tok),
    }
    print(
        f"[convert] tokenizer from text: AutoTokenizer ids equal SentencePiece's on "
        f"{len(lines)} lines (byte fallback included), {len(tok)} ids, bos/eos/pad "
        f"{config.get('bos_token_id')}/{config.get('eos_token_id')}/{config.get('pad_token_id')}"
        f", BOS {'added' if bos else 'not added'}",
        flush=True,
    )
    return torch.stack(rows), figures


def parity_batch(
    vocab_size: int, tokenizer: Path, text: list[str] | None, batch: int = 2, seq: int = 64
) -> torch.Tensor:
    """``batch`` rows of ``seq`` token ids of real Japanese and English text. Ids beyond a
    small test model's vocabulary are folded into it (the check is about the function)."""
    from megatron_llmjp.data.tokenizer import Tokenizer

    text = _check_text(text)
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
    defaults with the model derived from its args) with ``overrides``; only the sections the
    check uses are validated (the training run's data need not exist here)."""
    from dataclasses import replace

    from megatron_llmjp.checkpoint import megatron_lm
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.config.validate import WEIGHTS_ONLY

    if (ckpt_dir / "config.yaml").is_file():
        return build_config(ckpt_dir / "config.yaml", overrides, uses=WEIGHTS_ONLY)
    overrides = [*megatron_lm.model_overrides(manifest), *overrides]
    cfg = build_config(None, overrides, uses=WEIGHTS_ONLY)
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
    """Compare logits; raises ``ParityError`` with the figures unless they agree.

    When ``hf_dir`` ships a tokenizer (``tokenizer.json``), the check starts from text:
    :func:`check_tokenizer` first (a wrong tokenizer fails before any model is loaded), then
    the logits on ids the shipped tokenizer produced. Otherwise the ids come from the
    SentencePiece ``tokenizer`` (default: the checkpoint's ``data.tokenizer``, else LLM-jp-4's),
    folded into the vocabulary. ``manifest``: the checkpoint's description (needed for a
    Megatron-LM checkpoint)."""
    import yaml

    path = Path(ckpt_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    vocab = manifest["model"]["vocab_size"] if manifest else config["model"]["vocab_size"]
    tokenizer_figures = None
    if (Path(hf_dir) / "tokenizer.json").is_file():
        tokens, tokenizer_figures = check_tokenizer(Path(hf_dir), text)
    else:
        tok_path = Path(tokenizer) if tokenizer else _tokenizer_path(config)
        tokens = parity_batch(vocab, tok_path, text)
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
        "tokenizer": tokenizer_figures,
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
