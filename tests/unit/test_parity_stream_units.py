"""The streamed parity check without process groups: tolerances, device choice, and the
transformers side run module by module against transformers' own whole model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_llmjp.convert import parity
from megatron_llmjp.convert.transforms import ConversionError
from tests.distributed.test_convert import _hf_model

transformers = pytest.importorskip("transformers")


def test_hidden_tolerance_grows_with_depth():
    # 1e-4 of the largest value per decoder layer applied; the embedding counts as one.
    assert parity.hidden_tolerance(0) == parity.hidden_tolerance(1) == pytest.approx(1e-4)
    assert parity.hidden_tolerance(80) == pytest.approx(8e-3)


def test_compare_hidden_names_the_stage_and_the_bound():
    ref = torch.full((2, 3, 4), 10.0)
    got = ref.clone()
    got[1, 2, 3] += 0.002  # 2e-4 of max |ref| = 10
    one = parity.compare_hidden("layer 0 (decoder layer)", 1, ref, got)
    assert not one["passed"] and one["max_abs_diff"] == pytest.approx(0.002, rel=1e-3)
    assert one["tolerance"] == pytest.approx(1e-3)  # 1e-4 x 1 layer x 10
    three = parity.compare_hidden("layer 2 (decoder layer)", 3, ref, got)
    assert three["passed"] and three["tolerance"] == pytest.approx(3e-3)
    text = parity.stage_failure(parity.compare_hidden("layer 7 (decoder layer)", 1, ref, got))
    assert text.startswith("layer 7 (decoder layer): max |diff| 0.002 > 0.001")
    with pytest.raises(ConversionError, match=r"layer 3.*\(2, 3, 4\).*\(3, 2, 4\)"):
        parity.compare_hidden("layer 3", 4, ref, ref.transpose(0, 1))


def test_device_choice():
    assert parity.parity_device("cpu") == torch.device("cpu")
    with pytest.raises(ConversionError, match="'tpu'.*expected 'cpu' or 'cuda"):
        parity.parity_device("tpu")
    with pytest.raises(ConversionError, match="'gpu0'"):
        parity.parity_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConversionError, match="'cuda' was asked for, but CUDA is not avail"):
            parity.parity_device("cuda")


def test_bad_method_and_device_fail_before_any_work(tmp_path):
    # Nothing exists at these paths: the arguments are refused before anything is read.
    with pytest.raises(ConversionError, match="method 'fast'"):
        parity.check_parity(tmp_path / "hf", tmp_path / "ckpt", method="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConversionError, match="CUDA is not available"):
            parity.check_parity(tmp_path / "hf", tmp_path / "ckpt", device="cuda")


def _streamed_hf_logits(hf_dir, tokens):
    """The transformers side of the streamed check alone: embedding, layers, norm, head."""
    hf = parity._HFStream(hf_dir, torch.device("cpu"))
    h = hf.embed(tokens)
    for i in range(len(hf.base.layers)):
        h = hf.layer_forward(i, h)
    out = hf.logits(hf.final_norm(h))
    # Every module went back to the meta device: nothing stays allocated between stages.
    assert {p.device.type for p in hf.model.parameters()} == {"meta"}
    return out


def _tied_llama(out):
    from tests.distributed.test_convert import COMMON

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(intermediate_size=96, **{**COMMON, "tie_word_embeddings": True})
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["dense", "moe", "tied"])
def test_hf_modules_one_at_a_time_reproduce_transformers_model(kind, tmp_path):
    if kind == "tied":  # no lm_head.weight on disk: the head uses the embedding
        hf_dir = _tied_llama(tmp_path / "hf")
    else:
        hf_dir = _hf_model(kind, tmp_path / "hf", max_shard_size="200KB")
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        whole = model(tokens).logits
    streamed = _streamed_hf_logits(hf_dir, tokens)
    # The same modules and kernels on the same weights (experts fused by transformers' own
    # conversion mapping): equal to rounding of the batched MoE dispatch at most.
    assert streamed.shape == whole.shape == (2, 16, 1000)
    assert (streamed - whole).abs().max().item() <= 1e-6 * whole.abs().max().item()


def test_hf_names_are_accounted_for_as_transformers_loads_them(tmp_path):
    from safetensors.torch import load_file, save_file

    good = _hf_model("moe", tmp_path / "good")
    stream = parity._HFStream(good, torch.device("cpu"))
    assert type(stream.base.layers[0]).__name__ == "Qwen3MoeDecoderLayer"

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        tensors = load_file(d / "model.safetensors")
        edit(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return d

    extra = variant("extra", lambda t: t.update({"model.layers.1.mlp.bias": torch.zeros(4)}))
    with pytest.raises(ConversionError, match=r"at model.layers.1 .*would not use.*mlp.bias"):
        parity._HFStream(extra, torch.device("cpu"))
    gone = variant("gone", lambda t: t.pop("model.layers.2.self_attn.k_norm.weight"))
    with pytest.raises(ConversionError, match=r"model.layers.2 misses \['self_attn.k_norm"):
        parity._HFStream(gone, torch.device("cpu"))
    stray = variant("stray", lambda t: t.update({"model.extra.weight": torch.zeros(4)}))
    with pytest.raises(ConversionError, match=r"would not load: \['model.extra.weight'\]"):
        parity._HFStream(stray, torch.device("cpu"))
    cfg = json.loads((good / "config.json").read_text())
    small = variant("shape", lambda t: None)
    (small / "config.json").write_text(json.dumps({**cfg, "moe_intermediate_size": 24}))
    with pytest.raises(ConversionError, match=r"mlp.experts.gate_up_proj has shape \(4, 96, 64\)"):
        parity._HFStream(small, torch.device("cpu")).layer_forward(0, torch.zeros(1, 2, 64))


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_cli_refuses_a_parity_device_before_converting(device, tmp_path, capsys):
    from megatron_llmjp.cli.convert import main

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["hf-to-mcore", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")]
    assert main([*argv, "--parity-device", device]) == 2
    err = capsys.readouterr().err
    # Refused for the device, not for the missing input: nothing else was looked at.
    assert err.startswith(f"llmjp-convert: error: --parity-device: parity device '{device}'")
    assert not (tmp_path / "o").exists()
