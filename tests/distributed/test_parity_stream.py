"""The streamed parity check against the whole-model one, on the conversion test models.

Tiny random Llama and Qwen3-MoE models (``test_convert``'s) go HF -> megatron with the default
check (streamed); the streamed and the whole-model check then give the same verdict and the
same logits difference. A weight scaled in one layer (in the HF files or, through a faulty
import, in the megatron checkpoint) or in the final norm is reported at that stage, where the
whole-model check only sees the logits. Checks run in forked single-rank workers (each builds
and tears down its own gloo group).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_llmjp.convert import driver, parity
from megatron_llmjp.convert.transforms import ConversionError, ParityError
from tests.distributed.test_convert import _hf_model
from tests.helpers.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("transformers")


def _import(hf: Path, out: Path, check: bool) -> dict | None:
    return driver.hf_to_mcore(hf, out, overrides=[], parity=check, progress=False).parity


def _both(hf: Path, ckpt: Path) -> dict:
    """Each method's figures, or the text of its ParityError."""
    out = {}
    for method in ("streamed", "whole"):
        try:
            out[method] = parity.check_parity(hf, ckpt, method=method)
        except ParityError as e:
            out[method] = str(e)
    return out


def _scaled(src: Path, dst: Path, names: list[str], factor: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for n in names:
        tensors[n] = tensors[n] * factor
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _swapped(src: Path, dst: Path, pattern: str, a: str, b: str) -> Path:
    """A copy of ``src`` with tensors ``pattern.format(a)`` and ``pattern.format(b)`` swapped
    (a gate/up mix-up of a converter)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t[pattern.format(a)], t[pattern.format(b)] = t[pattern.format(b)], t[pattern.format(a)]
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind", ["dense", "moe", "tied"])
def test_streamed_check_agrees_with_the_whole_model_check(kind, tmp_path):
    if kind == "tied":  # the output layer is the embedding on both sides
        from tests.unit.test_parity_stream_units import _tied_llama

        hf = _tied_llama(tmp_path / "hf")
    else:
        hf = _hf_model(kind, tmp_path / "hf", max_shard_size="200KB")
    imported = spawn(_import, 1, hf, tmp_path / "mc", True, timeout=300)[0]
    assert imported["method"] == "streamed" and imported["passed"]  # the conversion default
    ckpt = tmp_path / "mc" / "iter_0000000"
    got = spawn(_both, 1, hf, ckpt, timeout=300)[0]
    streamed, whole = got["streamed"], got["whole"]
    assert streamed["passed"] and whole["passed"]
    assert streamed["top1_agreement"] == whole["top1_agreement"] == 1.0
    assert abs(streamed["max_abs_diff"] - whole["max_abs_diff"]) <= 1e-6
    assert streamed["max_abs_logit"] == pytest.approx(whole["max_abs_logit"], abs=1e-6)
    names = [s["name"] for s in streamed["stages"]]
    assert names == ["embedding", *(f"layer {i} (decoder layer)" for i in range(4)), "final norm"]
    # The embedding is a lookup of the same numbers on both sides.
    assert streamed["stages"][0]["max_abs_diff"] == 0.0


def _faults(mc: Path, layer_fault: Path, norm_fault: Path, swapped: Path) -> dict:
    out = _both(layer_fault, mc)
    with pytest.raises(ParityError) as e:
        parity.check_parity(swapped, mc)
    out["swapped"] = str(e.value)
    # The final-norm fault through the path a GPU node takes for a CPU check: a child process
    # that does not see CUDA (here forced by claiming CUDA in this worker).
    torch.cuda.is_available = lambda: True
    children = []
    in_child = parity._streamed_in_cpu_process
    parity._streamed_in_cpu_process = lambda *a: children.append(a) or in_child(*a)
    try:
        parity.check_parity(norm_fault, mc)
    except ParityError as e:
        out["norm"] = str(e)
    out["children"] = len(children)
    return out


def test_a_fault_is_reported_at_its_layer_and_at_the_final_norm(tmp_path):
    hf = _hf_model("dense", tmp_path / "hf")
    spawn(_import, 1, hf, tmp_path / "mc", False, timeout=300)
    layer_fault = _scaled(hf, tmp_path / "fc2", ["model.layers.2.mlp.down_proj.weight"], 1.5)
    norm_fault = _scaled(hf, tmp_path / "norm", ["model.norm.weight"], 1.5)
    swapped = _swapped(hf, tmp_path / "swap", "model.layers.0.mlp.{}_proj.weight", "gate", "up")
    ckpt = tmp_path / "mc" / "iter_0000000"
    got = spawn(_faults, 1, ckpt, layer_fault, norm_fault, swapped, timeout=300)[0]
    # Same verdict: the whole-model check fails as well, on the logits only.
    assert got["whole"].startswith("parity check failed: {")
    assert got["streamed"].startswith("parity check failed: layer 2 (decoder layer): max |diff|")
    assert got["norm"].startswith("parity check failed: final norm: max |diff|")
    assert got["children"] == 1
    assert got["swapped"].startswith("parity check failed: layer 0 (decoder layer): max |diff|")


def _checkpoint_fault(hf: Path, mc: Path) -> tuple[str, str, bool]:
    with pytest.raises(ParityError) as e:
        parity.check_parity(hf, mc)
    # A layer whose modules read nothing leaves every stored layer tensor unread: refused
    # before any data moves, and the process group is gone afterwards.
    parity._MegatronStream._layer_sharded = lambda self, i: {}
    with pytest.raises(ConversionError) as unread:
        parity.check_parity(hf, mc)
    return str(e.value), str(unread.value), torch.distributed.is_initialized()


def test_a_fault_in_the_checkpoint_is_reported_at_its_layer(tmp_path):
    # One expert of MoE layer 1 scaled on the megatron side (imported from faulty files).
    hf = _hf_model("moe", tmp_path / "hf")
    bad = _scaled(hf, tmp_path / "bad", ["model.layers.1.mlp.experts.0.down_proj.weight"], 2.0)
    spawn(_import, 1, bad, tmp_path / "mc", False, timeout=300)
    text, unread, group = spawn(_checkpoint_fault, 1, hf, tmp_path / "mc" / "iter_0000000")[0]
    assert text.startswith("parity check failed: layer 1 (decoder layer): max |diff|")
    assert "tensors no megatron-core module reads: ['decoder.layers." in unread
    assert not group
