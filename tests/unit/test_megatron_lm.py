"""Reading checkpoints written by Megatron-LM itself (``../shared/data/megatron-lm/``): the
model description derived from ``common.pt``'s args, ``llmjp-checkpoint info|verify``, and
every refusal (exit 2, nothing written). No process group; the logits checks against
Megatron-LM's own forward pass are in ``tests/distributed/test_megatron_lm_checkpoints.py``.

The inputs are checked against the data set's own ``SHA256SUMS`` after every test.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint import megatron_lm, store
from megatron_llmjp.checkpoint.manifest import describe_checkpoint
from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.cli import checkpoint as ckpt_cli
from megatron_llmjp.cli import convert as convert_cli
from megatron_llmjp.cli import upcycle as upcycle_cli


def _ckpt(mlm: Path, name: str) -> Path:
    return mlm / "checkpoints" / name


# -- the derived description ---------------------------------------------------------------


def test_dense_root_is_described_from_its_args(mlm):
    directory = store.resolve(_ckpt(mlm, "dense-tp2pp2"), "--input")
    assert directory.name == "iter_0000003"  # from latest_checkpointed_iteration.txt
    m = describe_checkpoint(directory)
    assert m["format"] == "megatron-lm" and m["iteration"] == 3 and m["consumed_samples"] == 12
    model = m["model"]
    # The data set's README: 4 layers, hidden 64, FFN 192, 4 heads, 2 query groups (head_dim
    # 16), NullTokenizer --vocab-size 1000 (+ EOD) padded to 1024, untied, RoPE 500000,
    # RMSNorm 1e-6.
    assert (model["num_layers"], model["hidden_size"], model["ffn_hidden_size"]) == (4, 64, 192)
    assert (model["num_attention_heads"], model["num_query_groups"], model["head_dim"]) == (
        4,
        2,
        16,
    )
    assert (model["vocab_size"], model["padded_vocab_size"]) == (1001, 1024)
    assert "NullTokenizer" in m["source"]["vocab_size"]
    assert model["tie_word_embeddings"] is False and model["qk_layernorm"] is False
    assert model["rope"]["base"] == 500000 and model["norm_epsilon"] == 1e-6
    assert model["hf_architecture"] == "LlamaForCausalLM" and model["moe"] is None
    p = m["parallel"]
    assert (p["tp"], p["pp"], p["ep"], p["world"]) == (2, 2, 1, 4)
    assert m["precision"]["params_dtype"] == "bf16"
    assert m["optimizer"]["saved"] and m["optimizer"]["sharding"] == "fully_sharded_model_space"


def test_moe_root_is_described_from_its_args(mlm):
    m = describe_checkpoint(store.resolve(_ckpt(mlm, "moe-ep2"), "--input"))
    model, moe = m["model"], m["model"]["moe"]
    # README: --kv-channels 32 (head_dim != hidden/heads), --qk-layernorm, 4 experts, top-2,
    # expert FFN 64, aux loss 1e-2, z-loss 1e-3, router in FP32, EP2 over 4 processes.
    assert model["head_dim"] == 32 and model["qk_layernorm"] is True
    assert model["hf_architecture"] == "Qwen3MoeForCausalLM"
    assert (moe["num_experts"], moe["router_topk"], moe["moe_ffn_hidden_size"]) == (4, 2, 64)
    router = moe["router"]
    assert router["norm_topk_prob"] is True and router["pre_softmax"] is False
    assert router["dtype"] == "fp32"
    assert (router["aux_loss_coeff"], router["z_loss_coeff"]) == (0.01, 0.001)
    assert (m["parallel"]["ep"], m["parallel"]["dp"]) == (2, 4)
    assert m["optimizer"]["chained"] == ["chained_0", "chained_1"]


def test_vocabulary_source_is_explicit_and_checked(mlm):
    directory = store.resolve(_ckpt(mlm, "dense-tp2pp2"), "--input")
    m = describe_checkpoint(directory, vocab_size=1000)
    assert m["model"]["vocab_size"] == 1000 and m["source"]["vocab_size"] == "given explicitly"
    with pytest.raises(CheckpointError, match="does not fit the checkpoint's 1024"):
        describe_checkpoint(directory, vocab_size=2000)
    common = megatron_lm.load_common(directory / "common.pt")
    a = dict(vars(common["args"]), tokenizer_type="HuggingFaceTokenizer")
    with pytest.raises(CheckpointError, match="--tokenizer DIR.*--vocab-size N"):
        megatron_lm.true_vocab(a, vocab_size=None, tokenizer=None)


def test_optimizer_keys_are_recognised():
    assert megatron_lm.is_optimizer_key("optimizer.state.exp_avg.decoder.final_layernorm.weight")
    assert megatron_lm.is_optimizer_key("chained_1.optimizer.state.fp32_param.x")
    assert not megatron_lm.is_optimizer_key("decoder.layers.mlp.router.weight")


def test_restricted_loader_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"args": argparse.Namespace(x=1), "evil": Evil()}, tmp_path / "common.pt")
    with pytest.raises(megatron_lm.MegatronLMError, match="restricted loader"):
        megatron_lm.load_common(tmp_path / "common.pt")
    assert not marker.exists()


# -- llmjp-checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,iteration,layout",
    [
        ("checkpoints/dense-tp2pp2", 3, "world=4 tp=2 pp=2"),
        ("checkpoints/moe-ep2", 3, "world=4 tp=1 pp=1 vpp=None cp=1 ep=2 etp=1 dp=4"),
        ("train-reference/init", 1, "world=1 tp=1 pp=1"),
    ],
)
def test_info_and_verify_report_iteration_and_layout(mlm, capsys, name, iteration, layout):
    root = mlm / name
    assert ckpt_cli.main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"iteration    {iteration} (consumed samples" in out
    assert f"layout       {layout}" in out and "written by Megatron-LM" in out
    assert ckpt_cli.main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "files intact" in out and f"iteration {iteration}" in out


def test_init_root_holds_no_optimizer(mlm, capsys):
    assert ckpt_cli.main(["info", str(mlm / "train-reference/init")]) == 0
    assert "optimizer    not saved (fp32 params)" in capsys.readouterr().out


def test_verify_finds_a_truncated_shard(mlm, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(_ckpt(mlm, "dense-tp2pp2"), copy)
    shard = copy / "iter_0000003" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert ckpt_cli.main(["verify", str(copy)]) == 2
    assert "__1_0.distcp has 100 bytes but .metadata needs" in capsys.readouterr().err


def test_release_pointer(mlm, tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    shutil.copytree(_ckpt(mlm, "dense-tp2pp2") / "iter_0000003", root / "release")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    assert store.resolve(root, "x") == root / "release"
    (root / "latest_checkpointed_iteration.txt").write_text("banana")
    with pytest.raises(CheckpointError, match="an iteration number or 'release'"):
        store.resolve(root, "checkpoint.load")


# -- refusals ------------------------------------------------------------------------------

REFUSED = [
    ("dense-layernorm", "--normalization LayerNorm"),
    ("moe-shared-expert", "--moe-shared-expert-intermediate-size 64"),
    ("dense-legacy", "--ckpt-convert-format torch_dist"),
]


@pytest.mark.parametrize("name,needle", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_roots_exit_2_and_write_nothing(mlm, tmp_path, capsys, name, needle):
    root = str(_ckpt(mlm, name))
    out = tmp_path / "out"
    assert ckpt_cli.main(["info", root]) == 2
    assert needle in capsys.readouterr().err
    assert convert_cli.main(["mcore-to-hf", "--input", root, "--output", str(out)]) == 2
    assert needle in capsys.readouterr().err
    argv = ["--input", root, "--output", str(out), "--experts", "2", "--topk", "1"]
    assert upcycle_cli.main([*argv, "--expert-ffn", "8"]) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# Each argument Megatron-LM accepts that the formats cannot express, set on the real MoE
# run's args, and the flag the refusal must name.
ARG_REFUSALS = [
    ({"normalization": "LayerNorm"}, "--normalization LayerNorm"),
    ({"add_bias_linear": True}, "--add-bias-linear"),
    ({"add_qkv_bias": True}, "--add-qkv-bias"),
    ({"position_embedding_type": "learned_absolute"}, "--position-embedding-type"),
    ({"rotary_percent": 0.5}, "--rotary-percent 0.5"),
    ({"rotary_interleaved": True}, "--rotary-interleaved"),
    ({"use_rope_scaling": True}, "--use-rope-scaling"),
    ({"swiglu": False}, "--swiglu absent"),
    ({"moe_layer_freq": [1, 0, 1, 0]}, "--moe-layer-freq [1, 0, 1, 0]"),
    ({"moe_layer_freq": 2}, "--moe-layer-freq 2"),
    ({"moe_shared_expert_intermediate_size": 64}, "--moe-shared-expert-intermediate-size"),
    ({"moe_router_score_function": "sigmoid"}, "--moe-router-score-function sigmoid"),
    ({"moe_router_enable_expert_bias": True}, "--moe-router-enable-expert-bias"),
    ({"moe_router_topk_scaling_factor": 2.5}, "--moe-router-topk-scaling-factor 2.5"),
    ({"mtp_num_layers": 1}, "--mtp-num-layers 1"),
]


@pytest.mark.parametrize("change,flag", ARG_REFUSALS, ids=[f for _, f in ARG_REFUSALS])
def test_each_inexpressible_argument_is_refused_by_name(mlm, tmp_path, capsys, change, flag):
    src = _ckpt(mlm, "moe-ep2") / "iter_0000003"
    args = vars(megatron_lm.load_common(src / "common.pt")["args"])
    assert megatron_lm._refusals(args) == []
    root = tmp_path / "root"
    (root / "iter_0000003").mkdir(parents=True)
    for f in (".metadata", "metadata.json"):
        shutil.copy(src / f, root / "iter_0000003" / f)
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    common = megatron_lm.load_common(src / "common.pt")
    real = {  # the stand-ins back to megatron's enums, as Megatron-LM pickles them
        "model_type": ModelType(args["model_type"].value),
        "attention_backend": AttnBackend(args["attention_backend"].value),
    }
    common["args"] = argparse.Namespace(**{**args, **real, **change})
    torch.save(common, root / "iter_0000003" / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("3\n")
    out = tmp_path / "hf"
    assert convert_cli.main(["mcore-to-hf", "--input", str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert flag in err and "can express" in err
    assert not out.exists()
