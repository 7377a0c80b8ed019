"""Parity check: the HF model and the megatron-core checkpoint must compute the same function.

Both sides run in FP32 (BF16 weights upcast exactly) on the same batch of real text tokenised
with the LLM-jp-4 tokenizer, so the only differences left are kernel rounding: a mapping
mistake (a transposed QKV group, a swapped gate/up, a wrong expert) shows as O(1) differences
and top-1 disagreement.

The default check is streamed (:func:`streamed_parity`): megatron-core and transformers run the
text side by side one stage at a time (embedding, each decoder layer, final norm, output
layer) with the real modules of each library, one layer's weights loaded at a time from the
checkpoint (``TensorReader``) and the safetensors files (``HFReader``). Hidden states are
compared after every stage and the logits at the end; the first stage that disagrees is named.
Memory holds about one layer of each model, so the check scales to LLM-jp-4-332B-A31B (a
layer of it is 16 GB in FP32, the whole pair 2.7 TB). It runs on CPU unless a GPU is asked
for. The whole-model check (``method="whole"``: both models loaded whole, logits compared)
remains as the reference the streamed one is tested against. Every tensor on either side must
be used: transformers' modules must get no missing, unexpected or mismatched tensor. The
megatron side runs in this process in a single-rank gloo group that is torn down afterwards.
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


def _one_process_overrides(batch: int, seq: int) -> list[str]:
    """The run config's overrides for a check on one process in FP32: no parallelism, one
    ``batch x seq`` micro-batch, no checkpointing."""
    return [
        *(f"parallel.{k}=1" for k in ("tp", "pp", "cp", "ep")),
        "parallel.vpp=null",
        "parallel.etp=null",
        "parallel.sequence_parallel=null",
        "parallel.moe_token_dispatcher=alltoall",  # one rank: any dispatcher is the same
        "precision.dtype=fp32",
        "precision.fp8=null",
        f"train.seq_length={seq}",
        f"train.micro_batch_size={batch}",
        f"train.global_batch_size={batch}",
        "checkpoint.dir=null",
        "checkpoint.load=null",
        "checkpoint.interval=0",
        "checkpoint.async_save=false",
    ]


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
    overrides = _one_process_overrides(b, s)
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


def _logits_figures(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """The logits criterion: max |diff| relative to max(1, max |logit|) and top-1 agreement of
    the two [batch, seq, vocab] tensors (``ref``: megatron-core, ``got``: transformers)."""
    if ref.shape != got.shape:
        raise ConversionError(f"parity check: logits shapes differ: {ref.shape} vs {got.shape}")
    peak = ref.abs().max().item()
    max_diff = (ref - got).abs().max().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    figures = {
        "max_abs_diff": max_diff,
        "max_abs_logit": peak,
        "rel_diff": max_diff / max(1.0, peak),
        "top1_agreement": top1,
        "thresholds": {"rel_diff": MAX_REL_DIFF, "top1_agreement": MIN_TOP1},
    }
    figures["passed"] = figures["rel_diff"] <= MAX_REL_DIFF and top1 >= MIN_TOP1
    return figures


def _print_logits(tokens: torch.Tensor, f: dict, how: str) -> None:
    print(
        f"[convert] parity ({how}) on {tokens.shape[0]}x{tokens.shape[1]} tokens: max |dlogit| "
        f"{f['max_abs_diff']:.3g} (max |logit| {f['max_abs_logit']:.3g}, rel "
        f"{f['rel_diff']:.2g} <= {MAX_REL_DIFF}), top-1 agreement {f['top1_agreement']:.4f} >= "
        f"{MIN_TOP1}: {'passed' if f['passed'] else 'FAILED'}",
        flush=True,
    )


def check_parity(
    hf_dir: Path,
    ckpt_dir: Path,
    *,
    text: list[str] | None = None,
    tokenizer: Path | None = None,
    manifest: dict | None = None,
    method: str = "streamed",
    device: str = "cpu",
) -> dict:
    """Compare the two models on real text; raises ``ParityError`` with the figures unless
    they agree.

    When ``hf_dir`` ships a tokenizer (``tokenizer.json``), the check starts from text:
    :func:`check_tokenizer` first (a wrong tokenizer fails before any model is loaded), then
    the models on ids the shipped tokenizer produced. Otherwise the ids come from the
    SentencePiece ``tokenizer`` (default: the checkpoint's ``data.tokenizer``, else LLM-jp-4's),
    folded into the vocabulary. ``manifest``: the checkpoint's description (needed for a
    Megatron-LM checkpoint).

    ``method="streamed"`` (the default, :func:`streamed_parity`) runs the two models layer by
    layer with about two layers of each in memory, on ``device`` ("cpu" unless asked);
    ``method="whole"`` loads both whole models in FP32 (CPU, this process) and compares
    logits only. Raises ``ConversionError`` for an unknown method or device."""
    import yaml

    if method not in ("streamed", "whole"):
        raise ConversionError(f"parity check: method {method!r}; expected 'streamed' or 'whole'")
    dev = parity_device(device) if method == "streamed" else None
    path = Path(ckpt_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    vocab = manifest["model"]["vocab_size"] if manifest else config["model"]["vocab_size"]
    tokenizer_figures = None
    if (Path(hf_dir) / "tokenizer.json").is_file():
        tokens, tokenizer_figures = check_tokenizer(Path(hf_dir), text)
    else:
        tok_path = Path(tokenizer) if tokenizer else _tokenizer_path(config)
        tokens = parity_batch(vocab, tok_path, text)
    if method == "streamed":
        result = streamed_parity(Path(hf_dir), Path(ckpt_dir), tokens, manifest, dev)
    else:
        ref = megatron_logits(Path(ckpt_dir), tokens, manifest)
        got = hf_logits(Path(hf_dir), tokens)
        result = {"method": "whole", **_logits_figures(ref, got)}
        _print_logits(tokens, result, "whole models")
    result["tokens"] = list(tokens.shape)
    result["tokenizer"] = tokenizer_figures
    if not result["passed"]:
        if "failed" in result:  # the streamed check names the first stage that disagrees
            figures = {k: v for k, v in result.items() if k not in ("stages", "failed")}
            raise ParityError(f"parity check failed: {result['failed']}; {figures}")
        raise ParityError(f"parity check failed: {result}")
    return result


# -- the streamed check ----------------------------------------------------------------------

# Hidden states after each stage are compared as max |diff| <= tolerance x max |reference|.
# Derivation: FP32 rounds at u = 2**-24 ~ 6e-8; a dot product of length K differs between two
# summation orders by about sqrt(K) * u relative to its terms (K <= 27,648, the largest
# LLM-jp-4 FFN: ~1e-5); a decoder layer chains about four such products plus norms and a
# softmax (~4e-5), and each layer adds its rounding to the residual stream, so after d layers
# the difference is at most ~d * 4e-5 of the largest value. HIDDEN_REL_DIFF_PER_LAYER rounds
# that up by 2.5x: tolerance(d) = 1e-4 * max(d, 1) (8e-3 after 80 layers), while a mapping
# mistake (a swapped projection, a scaled or wrong expert, a wrong norm) moves hidden states
# by O(1e-1..1) of their largest value. The logits keep the whole-model criterion above.
HIDDEN_REL_DIFF_PER_LAYER = 1e-4


def hidden_tolerance(depth: int) -> float:
    """Relative tolerance of hidden states after ``depth`` decoder layers (the embedding is
    depth 0, the final norm depth ``num_layers``): ``HIDDEN_REL_DIFF_PER_LAYER * max(depth, 1)``
    (derivation at :data:`HIDDEN_REL_DIFF_PER_LAYER`)."""
    return HIDDEN_REL_DIFF_PER_LAYER * max(depth, 1)


def compare_hidden(name: str, depth: int, ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Figures of one stage: ``ref`` (megatron-core) and ``got`` (transformers) hidden states of
    the same shape ([batch, seq, hidden]); ``passed`` when max |diff| <= ``hidden_tolerance(
    depth)`` x max |ref|. Raises ``ConversionError`` when the shapes differ."""
    if ref.shape != got.shape:
        raise ConversionError(
            f"parity check: {name}: hidden states of shapes {tuple(ref.shape)} (megatron-core) "
            f"and {tuple(got.shape)} (transformers)"
        )
    peak = ref.abs().max().item()
    diff = (ref.float() - got.float()).abs().max().item()
    tol = hidden_tolerance(depth)
    return {
        "name": name,
        "max_abs_diff": diff,
        "max_abs": peak,
        "tolerance": tol * peak,
        "rel_tolerance": tol,
        "passed": diff <= tol * peak,
    }


def stage_failure(stage: dict) -> str:
    """The ParityError text naming a failed stage, e.g. ``layer 7 (decoder layer): max |diff|
    0.52 > 0.0064 (0.0008 of max |hidden| 8)`` (tolerance 1e-4 x 8 layers of max |hidden|)."""
    return (
        f"{stage['name']}: max |diff| {stage['max_abs_diff']:.3g} > {stage['tolerance']:.3g} "
        f"({stage['rel_tolerance']:.2g} of max |hidden| {stage['max_abs']:.3g})"
    )


def parity_device(device: str) -> torch.device:
    """The device the streamed check runs on: ``"cpu"`` (the default, also on a GPU node) or
    ``"cuda"``/``"cuda:N"`` when asked. Raises ``ConversionError`` for another name or a CUDA
    device this process cannot see."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConversionError(f"parity device {device!r}: expected 'cpu' or 'cuda[:N]'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConversionError(f"parity device {device!r}: expected 'cpu' or 'cuda[:N]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConversionError(
                f"parity device {device!r} was asked for, but CUDA is not available here; "
                "run the check on 'cpu' (the default)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConversionError(
                f"parity device {device!r}: only {torch.cuda.device_count()} CUDA devices"
            )
    return dev


def _release(module: torch.nn.Module) -> None:
    """Free the storage of ``module``'s parameters; the module and its parameter objects stay
    (:func:`_reserve` allocates them again). Resizing storage is how torch's FSDP frees and
    re-allocates unsharded parameters."""
    for p in module.parameters():
        p.untyped_storage().resize_(0)


def _reserve(module: torch.nn.Module) -> None:
    """Allocate the storage :func:`_release` freed (contents undefined until loaded)."""
    for p in module.parameters():
        need = (p.storage_offset() + p.numel()) * p.element_size()
        if p.untyped_storage().nbytes() < need:
            p.untyped_storage().resize_(need)


class _MegatronStream:
    """The checkpoint's megatron-core model, one stage at a time, in a single-rank group.

    One GPTModel is built by ``models.build`` from the checkpoint's run config with
    ``num_layers=1`` (TP/PP/CP/EP 1, FP32): its embedding, rotary embedding, final norm and
    output layer, and ONE ``TransformerLayer`` into which each layer's weights are loaded in
    turn. Which global checkpoint slice fills which parameter comes from megatron-core's own
    ``sharded_state_dict`` (the layer's with the sharded offset of layer ``i`` of
    ``num_layers``, as ``TransformerBlock`` gives it), read with ``TensorReader``. The layer's
    ``layer_number`` (1) only selects query-key layer scaling (off in these models) and the
    per-layer bookkeeping of FP8 and MoE auxiliary losses (off in an FP32 evaluation): the
    same layer function for every ``i``."""

    def __init__(self, ckpt_dir: Path, manifest: dict | None, tokens: torch.Tensor, device):
        from dataclasses import replace

        from megatron_llmjp.checkpoint.manifest import describe_checkpoint
        from megatron_llmjp.checkpoint.megatron_lm import is_optimizer_key
        from megatron_llmjp.checkpoint.tensors import TensorReader
        from megatron_llmjp.parallel import cpu_compat
        from megatron_llmjp.parallel.layout import make_layout

        if device.type == "cpu":
            cpu_compat.force_cpu()  # megatron-core's CPU layers and gloo, also on a GPU node
        self.ckpt_dir = Path(ckpt_dir)
        b, s = tokens.shape
        overrides = _one_process_overrides(b, s)
        if manifest is None:
            manifest = describe_checkpoint(self.ckpt_dir, verify=False)
        cfg = _run_config(self.ckpt_dir, manifest, overrides)
        self.num_layers = cfg.model.num_layers
        self.vocab_size = cfg.model.vocab_size
        self.cfg = replace(cfg, model=replace(cfg.model, num_layers=1))
        self.layout = make_layout(self.cfg.parallel, self.cfg.model, self.cfg.train, 1)
        self.reader = TensorReader(self.ckpt_dir)
        self.stored = {k for k in self.reader.names() if not is_optimizer_key(k)}
        self.device = device
        self.chunk = None

    def __enter__(self) -> _MegatronStream:
        from megatron_llmjp.models.build import build_model_chunks
        from megatron_llmjp.parallel.dist import RankInfo, init_distributed, seed_everything

        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        init_distributed(RankInfo(0, 0, 1, "single"), self.layout, 5.0)
        try:
            seed_everything(self.cfg.train.seed)
            # Parameters are allocated, not initialised: untouched pages cost no memory.
            (self.chunk,) = build_model_chunks(self.cfg, self.layout)
            self.chunk.eval()
            self.layer = self.chunk.decoder.layers[0]
            self._check_keys()
        except BaseException:
            self.__exit__()  # no group outlives a failed start
            raise
        return self

    def __exit__(self, *exc) -> None:
        from megatron_llmjp.parallel.dist import destroy_distributed

        self.chunk = self.layer = self.rotary = None
        destroy_distributed()

    def _model_sharded(self) -> dict:
        from megatron_llmjp.checkpoint.state import SHARDING_METADATA

        sd = self.chunk.sharded_state_dict(metadata=SHARDING_METADATA)
        return {k: v for k, v in sd.items() if not k.startswith("decoder.layers.")}

    def _layer_sharded(self, i: int) -> dict:
        from megatron_llmjp.checkpoint.state import SHARDING_METADATA

        offsets = [(0, i, self.num_layers)]
        return self.layer.sharded_state_dict("decoder.layers.", offsets, SHARDING_METADATA)

    @staticmethod
    def _tensors(sharded: dict) -> list:
        """The ShardedTensors of a sharded state dict, factories (the SwiGLU fc1 halves) built;
        objects (Transformer Engine's ``_extra_state``) carry nothing an FP32 run needs."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        out = []
        for v in nested_values(sharded):
            if isinstance(v, ShardedTensorFactory):
                built = v.build()
                out += [
                    t for t in nested_values(built if isinstance(built, dict | list) else [built])
                ]
            elif isinstance(v, ShardedTensor):
                out.append(v)
        return out

    def _key(self, key: str) -> str:
        from megatron_llmjp.convert import mappings

        for k in (key, *mappings.ALIASES.get(key, ())):
            if k in self.stored:
                return k
        raise ConversionError(f"parity check: {self.ckpt_dir}: checkpoint lacks tensor {key}")

    def _check_keys(self) -> None:
        """Every model tensor the checkpoint stores is read by some module (as the export's
        own claim check demands), before any data moves."""
        keys = {self._key(t.key) for t in self._tensors(self._model_sharded())}
        keys |= {self._key(t.key) for t in self._tensors(self._layer_sharded(0))}
        unread = sorted(self.stored - keys)
        if unread:
            raise ConversionError(
                f"parity check: {self.ckpt_dir}: tensors no megatron-core module reads: "
                f"{unread[:6]}"
            )

    def _load(self, sharded: dict, what: str, params) -> None:
        """Fill the parameters ``params`` from the global checkpoint slices ``sharded`` names;
        every element of them must be covered."""
        tensors = self._tensors(sharded)
        requests: dict[tuple[str, tuple[int, ...]], None] = {}
        for t in tensors:
            requests.setdefault((self._key(t.key), tuple(t.global_offset[: t.prepend_axis_num])))
        slices = dict(zip(requests, self.reader.read_many(list(requests)), strict=True))
        covered = 0
        with torch.no_grad():
            for t in tensors:
                p = t.prepend_axis_num
                full = slices[(self._key(t.key), tuple(t.global_offset[:p]))]
                if tuple(full.shape) != tuple(t.global_shape[p:]):
                    raise ConversionError(
                        f"parity check: {self.ckpt_dir}: {t.key}{list(t.global_offset[:p])} has "
                        f"shape {tuple(full.shape)}, megatron-core expects {t.global_shape[p:]}"
                    )
                part = full[
                    tuple(
                        slice(o, o + n)
                        for o, n in zip(t.global_offset[p:], t.local_shape, strict=True)
                    )
                ]
                t.data.copy_(part)
                covered += t.data.numel()
        del slices
        expected = sum(q.numel() for q in params)
        if covered != expected:
            raise ConversionError(
                f"parity check: {what}: the checkpoint filled {covered} of {expected} elements"
            )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [seq, batch, hidden] of the embedding; its weight is released after."""
        emb = self.chunk.embedding
        sd = {k: v for k, v in self._model_sharded().items() if k.startswith("embedding.")}
        self._load(sd, "embedding", list(emb.parameters()))
        b, s = tokens.shape
        position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            out = emb(input_ids=tokens, position_ids=position_ids)
            self.rotary = self.chunk.rotary_pos_emb(s)
        if not self.chunk.share_embeddings_and_output_weights:
            _release(emb)
        return out

    def layer_forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``i`` (0-based) on [seq, batch, hidden]. The one layer's weights are
        freed between layers, so the transformers layer that runs next has the memory."""
        _reserve(self.layer)
        self._load(self._layer_sharded(i), f"layer {i}", list(self.layer.parameters()))
        with torch.no_grad():
            out, _ = self.layer(
                hidden_states=hidden, attention_mask=None, rotary_pos_emb=self.rotary
            )
        _release(self.layer)
        return out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = self.chunk.decoder.final_layernorm
        sd = {k: v for k, v in self._model_sharded().items() if k.startswith("decoder.")}
        self._load(sd, "final norm", list(norm.parameters()))
        with torch.no_grad():
            return norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, seq, true vocabulary] logits of the output layer (the embedding's weight
        when they are tied) on [seq, batch, hidden]."""
        weight = None
        if self.chunk.share_embeddings_and_output_weights:
            weight = self.chunk.shared_embedding_or_output_weight()
        else:
            out = self.chunk.output_layer
            sd = {k: v for k, v in self._model_sharded().items() if k.startswith("output_layer.")}
            self._load(sd, "output layer", list(out.parameters()))
        with torch.no_grad():
            logits, _ = self.chunk.output_layer(hidden, weight=weight)
        _release(self.chunk)
        return logits.transpose(0, 1)[..., : self.vocab_size].float().contiguous()


class _HFStream:
    """The HF directory as transformers builds it, one module at a time.

    ``AutoModelForCausalLM.from_config`` builds the model on the ``meta`` device (no memory,
    the same attention and experts implementations a ``from_pretrained`` load picks); each
    module (embedding, decoder layer ``i``, final norm, lm head) is materialised on the
    device, loaded from that module's safetensors names only (``HFReader``; on-disk per-expert
    tensors fused by transformers' own conversion mapping for the model type, as its loader
    does), run, and released. Every tensor on disk must be loaded by exactly one module and
    every module parameter filled, as ``from_pretrained`` with no missing, unexpected or
    mismatched keys demands."""

    def __init__(self, hf_dir: Path, device: torch.device):
        from transformers import AutoConfig, AutoModelForCausalLM

        from megatron_llmjp.convert.safetensors_io import HFReader

        self.hf_dir = Path(hf_dir)
        self.reader = HFReader(self.hf_dir)
        self.device = device
        config = AutoConfig.from_pretrained(str(self.hf_dir))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.config = self.model.config
        self.base = self.model.base_model
        self.converters = self._converters()
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        names = {m: n for n, m in self.model.named_modules()}
        self.stages = {
            "embedding": (self.model.get_input_embeddings(), names),
            "norm": (self.base.norm, names),
            "head": (self.model.get_output_embeddings(), names),
        }
        self.prefix = {
            "embedding": names[self.model.get_input_embeddings()] + ".",
            "norm": names[self.base.norm] + ".",
            "head": names[self.model.get_output_embeddings()] + ".",
        }
        self.layer_prefix = [names[m] + "." for m in self.base.layers]
        self._check_names()

    def _converters(self) -> list:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        found = get_checkpoint_conversion_mapping(self.config.model_type) or []
        return [c for c in found if isinstance(c, WeightConverter)]

    def _plan(self, module: torch.nn.Module, prefix: str) -> tuple[list, dict[str, str]]:
        """(converter groups, direct names) for one module: the disk names under ``prefix``
        that a conversion fuses, as (converter, {pattern: [names in index order]}, targets),
        and the others as {module key: disk name}."""
        import re

        rel = {n[len(prefix) :]: n for n in self.reader.names() if n.startswith(prefix)}
        if module is self.model.get_output_embeddings() and self.tied:
            rel = {"weight": self.prefix["embedding"] + "weight"}
        groups = []
        for c in self.converters:
            found: dict[str, list[tuple[int, str]]] = {}
            for pattern in c.source_patterns:
                rx = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))
                for r in list(rel):
                    m = rx.fullmatch(r)
                    if m:
                        found.setdefault(pattern, []).append((int(m.group(1) or 0), rel.pop(r)))
            if found:
                ordered = {p: [n for _, n in sorted(v)] for p, v in found.items()}
                groups.append((c, ordered, list(c.target_patterns)))
        return groups, rel

    def _expected(self, module: torch.nn.Module, prefix: str) -> tuple[set[str], set[str]]:
        """(module keys the plan fills, disk names it reads)."""
        groups, direct = self._plan(module, prefix)
        keys = set(direct) | {t for _, _, targets in groups for t in targets}
        disk = set(direct.values()) | {n for _, g, _ in groups for ns in g.values() for n in ns}
        return keys, disk

    def _check_names(self) -> None:
        seen: set[str] = set()
        modules = [
            (self.model.get_input_embeddings(), self.prefix["embedding"]),
            *((m, p) for m, p in zip(self.base.layers, self.layer_prefix, strict=True)),
            (self.base.norm, self.prefix["norm"]),
            (self.model.get_output_embeddings(), self.prefix["head"]),
        ]
        for module, prefix in modules:
            keys, disk = self._expected(module, prefix)
            want = set(module.state_dict())
            if keys != want:
                raise ConversionError(
                    f"parity check: {self.hf_dir}: transformers' {type(module).__name__} at "
                    f"{prefix[:-1]} misses {sorted(want - keys)[:4]} and would not use "
                    f"{sorted(keys - want)[:4]}"
                )
            seen |= disk
        unused = sorted(set(self.reader.names()) - seen)
        if unused:
            raise ConversionError(
                f"parity check: {self.hf_dir}: tensors transformers would not load: {unused[:6]}"
            )

    def _materialise(self, module: torch.nn.Module, prefix: str) -> None:
        """Allocate ``module`` on the device and load its weights from disk (FP32)."""
        groups, direct = self._plan(module, prefix)
        state = {k: self.reader.read(n) for k, n in direct.items()}
        for c, ordered, targets in groups:
            inputs = {p: [self.reader.read(n) for n in names] for p, names in ordered.items()}
            for op in c.operations:
                inputs = op.convert(inputs, c.source_patterns, targets, config=self.config)
            state.update(inputs)
        want = module.state_dict()
        for k, t in state.items():
            if tuple(t.shape) != tuple(want[k].shape):
                raise ConversionError(
                    f"parity check: {self.hf_dir}: {prefix}{k} has shape {tuple(t.shape)}, "
                    f"transformers expects {tuple(want[k].shape)}"
                )
        module.to_empty(device=self.device)
        module.load_state_dict(state, strict=True)
        del state

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [batch, seq, hidden] of the embedding (released after)."""
        emb = self.model.get_input_embeddings()
        self._materialise(emb, self.prefix["embedding"])
        b, s = tokens.shape
        self.position_ids = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        with torch.no_grad():
            out = emb(tokens)
        emb.to("meta")
        with torch.device(self.device):
            self.rotary = type(self.base.rotary_emb)(config=self.config)
        from transformers.masking_utils import create_causal_mask

        self.mask = create_causal_mask(
            config=self.config,
            inputs_embeds=out,
            attention_mask=None,
            cache=None,
            position_ids=self.position_ids,
        )
        with torch.no_grad():
            self.position_embeddings = self.rotary(out, position_ids=self.position_ids)
        return out

    def layer_forward(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.base.layers[i]
        self._materialise(layer, self.layer_prefix[i])
        with torch.no_grad():
            out = layer(
                hidden,
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
            )
        layer.to("meta")
        return out[0] if isinstance(out, tuple) else out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        self._materialise(self.base.norm, self.prefix["norm"])
        with torch.no_grad():
            out = self.base.norm(hidden)
        self.base.norm.to("meta")
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        self._materialise(head, self.prefix["head"])
        with torch.no_grad():
            out = head(hidden).float()
        head.to("meta")
        return out


def streamed_parity(
    hf_dir: Path,
    ckpt_dir: Path,
    tokens: torch.Tensor,
    manifest: dict | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Run megatron-core and transformers side by side, stage by stage, on ``tokens``
    [batch, seq]: embedding, each decoder layer, final norm, output layer, comparing the hidden
    states after every stage (:func:`compare_hidden`) and the logits at the end (the
    whole-model criterion, :data:`MAX_REL_DIFF` and :data:`MIN_TOP1`). Memory holds at most
    one layer of each model plus the slices being read (the embedding and output layer one
    at a time). Stops at the first stage that disagrees:
    the returned figures have ``passed=False`` and ``failed`` naming it (the caller raises
    ``ParityError``). Raises ``ConversionError`` for a tensor missing, unread or misshapen on
    either side, before any process group exists where it can."""
    dev = parity_device(str(device))
    if dev.type == "cpu" and torch.cuda.is_available():
        return _streamed_in_cpu_process(hf_dir, ckpt_dir, tokens, manifest)
    hf = _HFStream(hf_dir, dev)
    tokens = tokens.to(dev)
    stages: list[dict] = []
    result = {"method": "streamed", "device": str(dev), "stages": stages}

    def check(name: str, depth: int, ref: torch.Tensor, got: torch.Tensor) -> bool:
        stages.append(compare_hidden(name, depth, ref.transpose(0, 1), got))
        if not stages[-1]["passed"]:
            result.update(passed=False, failed=stage_failure(stages[-1]))
            print(f"[convert] parity (streamed): FAILED at {result['failed']}", flush=True)
        return stages[-1]["passed"]

    with _MegatronStream(ckpt_dir, manifest, tokens, dev) as mc:
        if mc.num_layers != len(hf.base.layers):
            raise ConversionError(
                f"parity check: {mc.num_layers} layers in the checkpoint, "
                f"{len(hf.base.layers)} in {hf_dir}/config.json"
            )
        ref, got = mc.embed(tokens), hf.embed(tokens)
        if not check("embedding", 0, ref, got):
            return result
        for i in range(mc.num_layers):
            ref, got = mc.layer_forward(i, ref), hf.layer_forward(i, got)
            if not check(f"layer {i} (decoder layer)", i + 1, ref, got):
                return result
        ref, got = mc.final_norm(ref), hf.final_norm(got)
        if not check("final norm", mc.num_layers, ref, got):
            return result
        ref_logits, got_logits = mc.logits(ref), hf.logits(got)
    figures = _logits_figures(ref_logits.cpu(), got_logits.cpu())
    result.update(figures)
    if not figures["passed"]:
        result["failed"] = (
            f"output layer (logits): rel diff {figures['rel_diff']:.2g} (<= {MAX_REL_DIFF}), "
            f"top-1 agreement {figures['top1_agreement']:.4f} (>= {MIN_TOP1})"
        )
    worst = max(stages[1:], key=lambda st: st["max_abs_diff"] / max(st["tolerance"], 1e-30))
    print(
        f"[convert] parity (streamed, {dev}): {len(stages)} stages agree (closest to its "
        f"tolerance: {worst['name']}, max |diff| {worst['max_abs_diff']:.3g} <= "
        f"{worst['tolerance']:.3g})",
        flush=True,
    )
    _print_logits(tokens, figures, "streamed")
    return result


def _streamed_in_cpu_process(
    hf_dir: Path, ckpt_dir: Path, tokens: torch.Tensor, manifest: dict | None
) -> dict:
    """:func:`streamed_parity` on CPU from a process that sees a GPU: run it in a child
    process with ``CUDA_VISIBLE_DEVICES`` empty, where megatron-core builds its CPU (local)
    layers and a gloo group exactly as on a CPU node. The child's figures come back as JSON;
    its ``ConversionError``/``ParityError`` is raised here with the child's message."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llmjp-parity-") as tmp:
        job = Path(tmp)
        torch.save({"tokens": tokens.cpu(), "manifest": manifest}, job / "inputs.pt")
        (job / "paths.json").write_text(json.dumps([str(hf_dir), str(ckpt_dir)]))
        from megatron_llmjp.parallel.cpu_compat import DEVICE_ENV

        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", DEVICE_ENV: "cpu"}
        cmd = [sys.executable, "-m", "megatron_llmjp.convert.parity", str(job)]
        done = subprocess.run(cmd, env=env, cwd=str(REPO), check=False)
        out = job / "result.json"
        if not out.is_file():
            raise ConversionError(
                f"parity check: the CPU process ({' '.join(cmd)}) exited with status "
                f"{done.returncode} and no result"
            )
        reply = json.loads(out.read_text(encoding="utf-8"))
    if "error" in reply:
        kind = ParityError if reply["error"] == "ParityError" else ConversionError
        raise kind(reply["message"])
    return reply["result"]


def _child_main(job: Path) -> int:
    """The child of :func:`_streamed_in_cpu_process`: ``job`` holds ``inputs.pt`` and
    ``paths.json``; writes ``result.json`` (the figures, or the error's type and text)."""
    import json

    inputs = torch.load(job / "inputs.pt", weights_only=True)
    hf_dir, ckpt_dir = json.loads((job / "paths.json").read_text(encoding="utf-8"))
    try:
        reply = {
            "result": streamed_parity(
                Path(hf_dir), Path(ckpt_dir), inputs["tokens"], inputs["manifest"], "cpu"
            )
        }
    except ConversionError as e:
        reply = {"error": type(e).__name__, "message": str(e)}
    tmp = job / "result.json.tmp"
    tmp.write_text(json.dumps(reply), encoding="utf-8")
    tmp.replace(job / "result.json")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_child_main(Path(sys.argv[1])))
