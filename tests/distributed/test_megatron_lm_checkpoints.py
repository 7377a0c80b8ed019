"""Checkpoints written by Megatron-LM itself, through every reader, against Megatron-LM's own
numbers (``../shared/data/megatron-lm/``: its FP32 reference logits on fixed tokens, and the
initial weights of its training reference as plain tensors).

- ``llmjp-convert mcore-to-hf`` on the dense TP2 x PP2 and the MoE EP2 roots: transformers
  loads the export and reproduces Megatron-LM's logits (FP32, max |diff| <= 1e-4, top-1 100%);
  the conversion parity model (this package's megatron-core model, which also loads the MoE
  pre-MLP norm from the local spec's key) does too.
- ``checkpoint.load=<Megatron-LM root> checkpoint.load_optimizer=false`` in a layout other than
  the saved one starts at iteration 0, and what it loaded computes Megatron-LM's logits.
- ``llmjp-upcycle`` from a Megatron-LM dense root: one expert with the whole FFN is the dense
  model, so the MoE computes Megatron-LM's dense logits.

Conversions and training run in forked workers (``tests/helpers/spawn.py``); the inputs are
checked against the data set's ``SHA256SUMS`` after every test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")
MAX_DIFF = 1e-4


def _reference(mlm: Path, name: str) -> dict:
    return torch.load(mlm / "reference" / f"{name}.pt", weights_only=True)


def _compare(got: torch.Tensor, ref: dict, what: str) -> float:
    """Max |diff| against Megatron-LM's logits (over the true vocabulary); asserts the bounds."""
    got = torch.as_tensor(got)
    want = ref["logits"][..., : got.shape[-1]].float()
    diff = (got.float() - want).abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{what}: max |dlogit| {diff:.2e} (max |logit| {want.abs().max():.2f}), top-1 {top1}")
    assert diff <= MAX_DIFF and top1 == 1.0, f"{what}: max |diff| {diff}, top-1 {top1}"
    return diff


def _megatron_logits(directory: str, tokens: torch.Tensor):
    """The parity model's logits, as a NumPy array (passed back from a forked worker by value)."""
    from megatron_llmjp.checkpoint import store
    from megatron_llmjp.convert.parity import megatron_logits

    return megatron_logits(store.resolve(directory, "x"), tokens).numpy()


def _export(root: str, out: str, tokens: torch.Tensor):
    from megatron_llmjp.convert.driver import mcore_to_hf

    report = mcore_to_hf(root, out, progress=False)
    return report.parity, report.notes, _megatron_logits(root, tokens)


def _export_only(root: str, out: str) -> None:
    from megatron_llmjp.convert.driver import mcore_to_hf

    mcore_to_hf(root, out, parity=False, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense-tp2pp2", "moe-ep2"])
def test_export_reproduces_megatron_lm_logits(mlm, tmp_path, name):
    ref = _reference(mlm, name)
    root, out = mlm / "checkpoints" / name, tmp_path / "hf"
    parity, notes, mcore = spawn(_export, 1, str(root), str(out), ref["tokens"])[0]
    assert parity["passed"] and "NullTokenizer" in notes[1]
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 1001 and config["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        hf = model(ref["tokens"]).logits
    _compare(hf, ref, f"{name}: transformers on the export vs Megatron-LM")
    _compare(mcore, ref, f"{name}: parity model on the checkpoint vs Megatron-LM")


def test_init_root_exports_megatron_lm_initial_weights(mlm, tmp_path):
    """The training reference's initial root (FP32, no optimizer) exports to exactly the
    tensors Megatron-LM's tools wrote as plain ``init_weights.pt``."""
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    spawn(_export_only, 1, str(mlm / "train-reference" / "init"), str(out))
    hf = {}
    for f in sorted(out.glob("*.safetensors")):
        hf.update(load_file(f))
    want = torch.load(mlm / "train-reference" / "init_weights.pt", weights_only=True)
    pairs = {"model.embed_tokens.weight": "embedding.word_embeddings.weight"}
    pairs["lm_head.weight"] = "output_layer.weight"
    pairs["model.norm.weight"] = "decoder.final_layernorm.weight"
    for layer in range(4):
        m, h = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        pairs[h + "input_layernorm.weight"] = m + "input_layernorm.weight"
        pairs[h + "post_attention_layernorm.weight"] = m + "pre_mlp_layernorm.weight"
        pairs[h + "self_attn.o_proj.weight"] = m + "self_attention.linear_proj.weight"
        pairs[h + "mlp.down_proj.weight"] = m + "mlp.linear_fc2.weight"
    for h, m in pairs.items():
        rows = hf[h].shape[0]
        assert torch.equal(hf[h], want[m][:rows]), h  # vocabulary: 1001 of 1024 rows
    assert hf["model.embed_tokens.weight"].shape == (1001, 64)


# -- continued pre-training ----------------------------------------------------------------


def _overrides(mlm: Path, name: str) -> list[str]:
    from megatron_llmjp.checkpoint import megatron_lm, store
    from megatron_llmjp.checkpoint.manifest import describe_checkpoint

    root = mlm / "checkpoints" / name
    manifest = describe_checkpoint(store.resolve(root, "x"))
    return [
        *megatron_lm.model_overrides(manifest),
        "data.synthetic=true",
        "train.seq_length=64",
        "train.micro_batch_size=1",
        "train.global_batch_size=4",
        "logging.tensorboard=false",
        f"checkpoint.load={root}",
        "checkpoint.load_optimizer=false",
    ]


def _train(overrides: list[str]) -> dict:
    from megatron_llmjp.training.trainer import run

    result = run(build_config(overrides=overrides))
    return {
        "loss": [r["loss"] for r in result.history],
        "iteration": result.progress.iteration,
    }


# Saved TP2 x PP2 -> DP2; saved EP2 (DP4) -> TP2 with EP1.
CPT = [("dense-tp2pp2", ["parallel.tp=1"]), ("moe-ep2", ["parallel.tp=2", "parallel.ep=1"])]


@pytest.mark.slow
@pytest.mark.parametrize("name,layout", CPT, ids=[c[0] for c in CPT])
def test_continued_pretraining_from_megatron_lm_in_another_layout(mlm, tmp_path, name, layout):
    base = [*_overrides(mlm, name), *layout]
    ckpt = tmp_path / "ckpt"
    # 0 iterations: the loaded weights are saved as they are (iteration 0), in this layout.
    got = spawn(
        _train, 2, [*base, "train.iters=0", f"checkpoint.dir={ckpt}", f"output_dir={tmp_path}/a"]
    )[-1]
    assert got == {"loss": [], "iteration": 0}
    ref = _reference(mlm, name)
    logits = spawn(_megatron_logits, 1, str(ckpt), ref["tokens"])[0]
    _compare(logits, ref, f"{name}: loaded by the trainer ({layout}) vs Megatron-LM")
    # Training continues from iteration 0 (Megatron-LM saved iteration 3).
    got = spawn(_train, 2, [*base, "train.iters=2", f"output_dir={tmp_path}/b"])[-1]
    assert got["iteration"] == 2 and len(got["loss"]) == 2
    assert all(0 < x < 8 for x in got["loss"])


def _preflight(overrides: list[str]):
    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    return check_runtime(build_config(overrides=overrides), RankInfo(0, 0, 1, "single"))


def test_every_model_field_is_checked_against_the_args(mlm):
    from megatron_llmjp.checkpoint.store import CheckpointError

    base = _overrides(mlm, "moe-ep2")
    plan = _preflight(base).resume
    assert plan.megatron_lm and not plan.full and plan.notes == []
    with pytest.raises(CheckpointError) as e:
        _preflight([*base, "model.rotary_base=10000", "model.moe_norm_topk_prob=false"])
    msg = str(e.value)
    assert "model.rotary_base: checkpoint 500000.0, config 10000.0" in msg
    assert "model.moe_norm_topk_prob: checkpoint True, config False" in msg
    with pytest.raises(CheckpointError, match="model.vocab_size: checkpoint 1001, config 1000"):
        _preflight([*base, "model.vocab_size=1000"])
    plan = _preflight([*base, "model.moe_aux_loss_coeff=0.02"]).resume
    assert plan.notes == ["model.moe_aux_loss_coeff: checkpoint 0.01, config 0.02"]


def test_full_resume_refusals_name_the_format(mlm):
    """On one process moe-ep2 cannot keep its expert split (full resume itself:
    ``test_megatron_lm_resume.py``); the training reference's initial root holds no optimizer."""
    from megatron_llmjp.checkpoint.store import CheckpointError

    base = _overrides(mlm, "moe-ep2")
    with pytest.raises(CheckpointError, match="'fully_sharded_model_space' form, chained as.*ep=1"):
        _preflight([*base, "checkpoint.load_optimizer=true"])
    init = mlm / "train-reference" / "init"
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        _preflight(
            [
                *_overrides(mlm, "dense-tp2pp2"),
                f"checkpoint.load={init}",
                "checkpoint.load_optimizer=true",
                "model.ffn_hidden_size=192",
            ]
        )


# -- upcycling -----------------------------------------------------------------------------


def _upcycle_logits(root: str, out: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_llmjp.upcycle.driver import UpcycleSpec, upcycle

    spec = UpcycleSpec(num_experts=1, topk=1, expert_ffn=192, drop_ratio=0.0)
    upcycle(root, out, spec, progress=False)
    return _megatron_logits(out, tokens)


@pytest.mark.slow
def test_upcycling_a_megatron_lm_root_keeps_its_function(mlm, tmp_path):
    ref = _reference(mlm, "dense-tp2pp2")
    root = mlm / "checkpoints" / "dense-tp2pp2"
    logits = spawn(_upcycle_logits, 1, str(root), str(tmp_path / "moe"), ref["tokens"])[0]
    _compare(logits, ref, "one-expert upcycled MoE vs Megatron-LM's dense model")


@pytest.mark.parametrize(
    "name,flag",
    [
        ("dense-layernorm", "--normalization LayerNorm"),
        ("moe-shared-expert", "--moe-shared-expert-intermediate-size 64"),
        ("dense-legacy", "--ckpt-convert-format torch_dist"),
    ],
)
def test_trainer_refuses_what_it_cannot_load(mlm, tmp_path, name, flag):
    from megatron_llmjp.checkpoint.store import CheckpointError

    base = [*_overrides(mlm, "dense-tp2pp2"), f"checkpoint.load={mlm / 'checkpoints' / name}"]
    with pytest.raises(CheckpointError, match=flag):
        _preflight([*base, f"checkpoint.dir={tmp_path / 'ckpt'}"])
    assert list(tmp_path.iterdir()) == []
