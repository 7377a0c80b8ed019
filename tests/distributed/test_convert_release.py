"""A release as a user gets it, on both families: tiny Llama and Qwen3-MoE models with the real
LLM-jp-4 vocabulary (196,608) go HF -> megatron -> HF with ``--tokenizer`` pointing at the
SentencePiece folder. The export's parity check starts from text; AutoTokenizer and
``generate()`` work on the output; a tokenizer with shifted special ids fails the export (exit 3)
and publishes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_llmjp.convert import driver
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")
VOCAB = 196_608
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizer" / "llm-jp-tokenizer-v4.0"
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=4,
)


def _hf_model(kind: str, out: Path) -> Path:
    torch.manual_seed(0)
    if kind == "dense":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(intermediate_size=96, **COMMON)
        )
    else:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=96,  # no layer uses it; the round trip must keep it
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            **COMMON,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.15)
    model.save_pretrained(out)
    return out


def _import(hf: Path, out: Path) -> None:
    driver.hf_to_mcore(hf, out, overrides=[], parity=False, progress=False)


def _export(ckpt: Path, out: Path, tokenizer: Path) -> dict:
    return driver.mcore_to_hf(ckpt, out, tokenizer=str(tokenizer), progress=False).parity


def _cli(args: list[str]) -> int:
    from megatron_llmjp.cli.convert import main

    return main(args)


@pytest.fixture(scope="module", params=["dense", "moe"])
def release(request, tmp_path_factory):
    if not TOKENIZER.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    root = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param, root / "hf")
    spawn(_import, 1, hf, root / "mc", timeout=300)
    parity = spawn(_export, 1, root / "mc", root / "release", TOKENIZER, timeout=300)[0]
    return request.param, root, parity


def test_release_loads_and_matches_sentencepiece(release):
    kind, root, parity = release
    out = root / "release"
    assert parity["passed"] and parity["top1_agreement"] == 1.0
    figures = parity["tokenizer"]
    assert figures["sentencepiece_reference"] and figures["lines"] >= 500
    assert figures["vocab"] == VOCAB and not figures["adds_bos"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert len(tok) == cfg["vocab_size"] == VOCAB
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 4)
    assert gen["eos_token_id"] == [2, 6, 13] and gen["bos_token_id"] == 1
    # Every config.json field of the input comes back (MoE: the unused intermediate_size).
    src = json.loads((root / "hf" / "config.json").read_text())
    changed = {k for k in src if k != "transformers_version" and cfg.get(k) != src[k]}
    assert not changed, {k: (src[k], cfg.get(k)) for k in changed}


def _emit_eod(model, eod: int) -> None:
    """Make ``model`` put EOD first at every position, by construction: residual dimension 0
    holds 100 for every token (embedding column 0; nothing writes to it), so the final norm's
    output there is positive, and the output row of EOD reads only that dimension."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 100.0
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.down_proj.weight")):
                p[0] = 0
            elif name.endswith("experts.down_proj"):  # fused [experts, hidden, ffn]
                p[:, 0] = 0
            elif "experts" in name and name.endswith("down_proj.weight"):
                p[0] = 0
        model.lm_head.weight[eod] = 0
        model.lm_head.weight[eod, 0] = 1000.0


def test_generate_stops_at_eod(release):
    _, root, _ = release
    out = root / "release"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    enc = tok("日本の首都は", return_tensors="pt")
    assert enc["input_ids"][0, 0] != tok.bos_token_id  # no BOS: as in training
    free = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert free.shape[1] == enc["input_ids"].shape[1] + 8  # random weights: runs to the limit
    eod = tok.convert_tokens_to_ids("<|eod|>")
    _emit_eod(model, eod)
    stopped = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert stopped[0, -1].item() == eod and stopped.shape[1] == enc["input_ids"].shape[1] + 1
    # Only generation_config.json's stop list stops it: with EOS alone it runs on.
    ran_on = model.generate(**enc, max_new_tokens=8, do_sample=False, eos_token_id=2)
    assert ran_on.shape[1] == enc["input_ids"].shape[1] + 8


def test_shifted_special_ids_fail_the_export(release, tmp_path):
    kind, root, _ = release
    if kind != "dense":
        pytest.skip("the tokenizer gate does not depend on the family")
    src = tmp_path / "tokenizer"
    src.mkdir()
    for f in TOKENIZER.iterdir():
        (src / f.name).symlink_to(f)
    data = json.loads((root / "release" / "tokenizer.json").read_text())
    # Shift <|startoftext|>/<|return|> (1, 2) to 2, 3 and <|mask|> (3) to 1.
    shift = {1: 2, 2: 3, 3: 1}
    vocab = data["model"]["vocab"]
    vocab[1], vocab[2], vocab[3] = vocab[3], vocab[1], vocab[2]
    for t in data["added_tokens"]:
        t["id"] = shift.get(t["id"], t["id"])
    (src / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    out = tmp_path / "out"
    args = ["mcore-to-hf", "--input", str(root / "mc"), "--output", str(out)]
    code = spawn(_cli, 1, [*args, "--tokenizer", str(src), "--no-progress"], timeout=300)[0]
    assert code == 3
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
