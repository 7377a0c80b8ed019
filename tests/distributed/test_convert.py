"""Megatron <-> Hugging Face conversion through the real trainer and transformers.

Random tiny Llama and Qwen3-MoE models built with transformers (GQA, head_dim != hidden/heads,
qk-norm for MoE, untied embeddings, a vocabulary of 1000 that TP pads to 1024) go HF ->
megatron; the trainer loads that into TP2 x PP2 (dense) or TP2 x EP2 (MoE) and saves a truly
sharded checkpoint; that exports back to HF with bit-identical tensors and config. Every
conversion runs its parity check. Conversions run in forked single-rank workers so the pytest
process keeps no process group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.convert import driver
from megatron_llmjp.convert.transforms import ConversionError
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")
TOKENIZER = (
    Path(__file__).resolve().parents[2].parent / "shared/data/tokenizer/llm-jp-tokenizer-v4.0"
)
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 4}
COMMON = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    **TOKEN_IDS,
)


def _hf_model(kind: str, out: Path, **save_kw) -> Path:
    torch.manual_seed(0)
    if kind == "dense":
        cfg = transformers.LlamaConfig(intermediate_size=96, **COMMON)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=96,  # unused without dense layers; kept through the round trip
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            router_aux_loss_coef=0.01,
            **COMMON,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # larger weights than HF's init: logits of order 10, a sharp test
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.15)
    model.save_pretrained(out, **save_kw)
    return out


def _in_worker(fn, *args):
    return spawn(fn, 1, *args, timeout=300)[0]


def _import(hf: Path, out: Path, overrides: list[str]) -> dict:
    return driver.hf_to_mcore(hf, out, overrides=overrides, progress=False).parity


def _export(ckpt: Path, out: Path, kw: dict) -> dict:
    return driver.mcore_to_hf(ckpt, out, progress=False, **kw).parity


def _relayout(ckpt: Path, out: Path, overrides: list[str]) -> int:
    """Load ``ckpt`` (weights only) into the trainer at a layout and save it again (iters=0)."""
    from megatron_llmjp.training.trainer import run

    cfg = build_config(
        ckpt / "iter_0000000" / "config.yaml",
        [
            *overrides,
            "data.synthetic=true",
            "train.iters=0",
            "train.seq_length=64",
            "train.micro_batch_size=1",
            "train.global_batch_size=8",
            "logging.tensorboard=false",
            f"checkpoint.load={ckpt}",
            "checkpoint.load_optimizer=false",
            f"checkpoint.dir={out / 'checkpoints'}",
            f"output_dir={out}",
        ],
    )
    return run(cfg).progress.iteration


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def _config(d: Path) -> dict:
    cfg = transformers.AutoConfig.from_pretrained(d).to_dict()
    for volatile in ("transformers_version", "_name_or_path"):
        cfg.pop(volatile, None)
    return cfg


ROUNDTRIPS = [
    # The dense case moves the embedding and output layer in blocks of rows (as a 196,608
    # vocabulary would), including the zero padding rows written as a chunk of their own.
    ("llama-tp2xpp2", "dense", 4, ["parallel.tp=2", "parallel.pp=2"], 50_000),
    ("qwen3moe-tp2xep2", "moe", 4, ["parallel.tp=2", "parallel.ep=2"], None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,world,layout,block", ROUNDTRIPS, ids=[r[0] for r in ROUNDTRIPS])
def test_hf_megatron_hf_roundtrip_is_bit_identical(
    name, kind, world, layout, block, tmp_path, monkeypatch
):
    if block is not None:
        monkeypatch.setattr(driver, "BLOCK_BYTES", block)
    hf = _hf_model(kind, tmp_path / "hf", max_shard_size="200KB")
    parity = _in_worker(_import, hf, tmp_path / "imported", layout)
    assert parity["passed"] and parity["top1_agreement"] == 1.0 and parity["max_abs_logit"] > 2
    manifest = json.loads((tmp_path / "imported" / "iter_0000000" / "manifest.json").read_text())
    assert (
        manifest["model"]["padded_vocab_size"] == 1024 and manifest["model"]["vocab_size"] == 1000
    )
    assert manifest["optimizer"]["saved"] is False
    # The trainer loads it into a real layout and saves a checkpoint sharded that way.
    spawn(_relayout, world, tmp_path / "imported", tmp_path / "relaid", layout)
    saved = tmp_path / "relaid" / "checkpoints"
    saved_manifest = json.loads((saved / "iter_0000000" / "manifest.json").read_text())
    assert saved_manifest["parallel"]["tp"] == 2 and saved_manifest["parallel"]["world"] == world
    _in_worker(_export, saved, tmp_path / "hf2", {"max_shard_size": 100_000})
    a, b = _tensors(hf), _tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b)
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not unequal
    assert _config(hf) == _config(tmp_path / "hf2")
    raw_in = json.loads((hf / "config.json").read_text())
    raw_out = json.loads((tmp_path / "hf2" / "config.json").read_text())
    # Every field of the input config.json comes back (the writer's version aside).
    raw_in.pop("transformers_version")
    assert {k: v for k, v in raw_in.items() if raw_out.get(k) != v} == {}
    if kind == "moe":
        assert "model.layers.3.mlp.experts.3.up_proj.weight" in b  # per-expert keys on disk
    assert (tmp_path / "hf2" / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _train(overrides: list[str]) -> None:
    from megatron_llmjp.training.trainer import run

    run(build_config(overrides=overrides))


TRAINED = [
    ("dense-pp2-vpp2", 2, ["model.name=llm-jp-4-tiny-dense", "parallel.pp=2", "parallel.vpp=2"]),
    (
        "moe-tp2xep2xetp2-bf16",
        4,
        [
            "model.name=llm-jp-4-tiny-moe",
            *("parallel.tp=2", "parallel.ep=2", "parallel.etp=2"),
            "precision.dtype=bf16",
        ],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,world,overrides", TRAINED, ids=[t[0] for t in TRAINED])
def test_trained_checkpoint_exports_and_passes_parity(name, world, overrides, tmp_path):
    # A vocabulary of 1000 cannot ship the 196,608-id tokenizer (refused before writing):
    # exported without one, the parity check feeds LLM-jp-4 ids folded into the vocabulary.
    # The tokenizer files are tested in test_convert_release.py.
    run = [
        *overrides,
        "model.vocab_size=1000",
        "data.synthetic=true",
        "train.iters=3",
        "train.seq_length=64",
        "train.global_batch_size=4",
        "schedule.warmup_iters=1",
        "logging.tensorboard=false",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.interval=2",  # the saved config.yaml has saving on; parity must cope
        f"output_dir={tmp_path / 'run'}",
    ]
    spawn(_train, world, run)
    parity = _in_worker(_export, tmp_path / "ckpt", tmp_path / "hf", {})
    assert parity["passed"] and parity["top1_agreement"] >= 0.99
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 6]  # EOS and the EOD that ends training documents
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    bf16 = "bf16" in " ".join(overrides)
    assert cfg["torch_dtype"] == ("bfloat16" if bf16 else "float32")
    assert cfg["vocab_size"] == 1000


def test_a_wrong_mapping_fails_parity_and_writes_nothing(tmp_path, monkeypatch):
    hf = _hf_model("dense", tmp_path / "hf")
    spawn(_import_no_parity, 1, hf, tmp_path / "mc")
    split, merge = driver.TRANSFORMS["gate_up"]
    monkeypatch.setitem(driver.TRANSFORMS, "gate_up", (lambda t, d: split(t, d)[::-1], merge))
    with pytest.raises(RuntimeError, match="ParityError: parity check failed"):
        _in_worker(_export, tmp_path / "mc", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _import_no_parity(hf: Path, out: Path) -> None:
    driver.hf_to_mcore(hf, out, overrides=[], parity=False, progress=False)


def _expect_error(hf: Path, out: Path, match: str) -> None:
    with pytest.raises(ConversionError, match=match):
        driver.hf_to_mcore(hf, out, overrides=["parallel.tp=2"], parity=False, progress=False)
    assert not out.exists() and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_bad_hf_inputs_fail_clearly_and_leave_nothing(tmp_path):
    good = _hf_model("dense", tmp_path / "good", max_shard_size="200KB")
    out = tmp_path / "out"

    def variant(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        return d

    d = variant("arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    _expect_error(d, out, "architectures")
    d = variant("shard")
    next(d.glob("model-00002-*.safetensors")).unlink()
    _expect_error(d, out, "model-00002-.* listed in model.safetensors.index.json is missing")
    d = variant("shape")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    _expect_error(
        d, out, r"mlp.gate_proj.weight has shape \(96, 64\), config.json implies \(128, 64\)"
    )
    d = variant("index")
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    _expect_error(d, out, "corrupted index")
    d = variant("extra")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("lm_head.weight")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(d, out, "lm_head.weight is mapped to|missing tensors")
    with pytest.raises(
        ConversionError, match="model.* comes from the HF config|cannot be overridden"
    ):
        driver.hf_to_mcore(
            good, out, overrides=["model.num_layers=2"], parity=False, progress=False
        )
    out.mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        driver.hf_to_mcore(good, out, overrides=[], parity=False, progress=False)


def test_bad_checkpoints_fail_clearly_and_leave_nothing(tmp_path):
    hf = _hf_model("dense", tmp_path / "hf")
    spawn(_import_no_parity, 1, hf, tmp_path / "mc")
    ckpt = tmp_path / "mc" / "iter_0000000"
    out = tmp_path / "out"
    broken = tmp_path / "truncated"
    shutil.copytree(tmp_path / "mc", broken)
    victim = sorted((broken / "iter_0000000").glob("*.distcp"))[3]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        driver.mcore_to_hf(broken, out, parity=False, progress=False)
    if TOKENIZER.is_dir():
        with pytest.raises(ConversionError, match="has 196608 ids, the model's vocabulary is 1000"):
            driver.mcore_to_hf(tmp_path / "mc", out, tokenizer=str(TOKENIZER), progress=False)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    wrong = tmp_path / "wrong-shape"
    shutil.copytree(tmp_path / "mc", wrong)
    manifest["model"]["ffn_hidden_size"] = 128
    (wrong / "iter_0000000" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConversionError, match=r"linear_fc1.weight has shape \(4, 192, 64\)"):
        driver.mcore_to_hf(wrong, out, parity=False, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_exit_codes(tmp_path, capsys):
    from megatron_llmjp.cli.convert import main

    assert (
        main(["mcore-to-hf", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("llmjp-convert: error: --input:") and "does not exist" in err
