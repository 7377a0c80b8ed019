"""TP larger than the KV groups: megatron-core replicates each K/V head on tp / groups ranks.

The tiny models have 4 query heads in 2 KV groups; ``parallel.tp=4`` puts one query head on
each rank and each KV group on two (the MoE model also normalises q and k per head after the
split, and shards its experts over the 4 ranks). The run must reproduce the single-process
run in FP32 (losses, gradient norms and the final parameters and Adam moments, within the
bounds of ``test_parity``), and its checkpoint (global tensors) must export to Hugging Face
with the tensors of the single-process layout's names and shapes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_parity import FP32_BOUND, STEPS, _compare, _run
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
MODELS = ["model.name=llm-jp-4-tiny-dense", "model.name=llm-jp-4-tiny-moe"]


def _export(ckpt: str, out: str) -> list[str]:
    from safetensors import safe_open

    from megatron_llmjp.convert.driver import mcore_to_hf

    mcore_to_hf(ckpt, out, parity=False, progress=False)
    names = []
    for f in sorted(Path(out).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            names += [f"{k}:{tuple(s.get_slice(k).get_shape())}" for k in s.keys()]  # noqa: SIM118
    return sorted(names)


@pytest.mark.parametrize("model", MODELS, ids=["dense", "moe"])
def test_tp4_on_two_kv_groups_matches_single_process(model, tmp_path):
    ref = _run(1, [model], tmp_path / "ref")
    got = _run(4, [model, "parallel.tp=4"], tmp_path / "tp4")
    diffs = _compare(got, ref)
    print("max rel diff:", " ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    for key, diff in diffs.items():
        assert diff < FP32_BOUND[key], (
            f"{key}: max rel diff {diff:.2e} against the single-process run, bound "
            f"{FP32_BOUND[key]:.0e}"
        )
    assert ref["loss"][-1] < ref["loss"][0]
    # The TP4 checkpoint exports like the single-process one (forked: no group in pytest).
    from megatron_llmjp.checkpoint.store import iter_name

    exported = [
        spawn(_export, 1, str(tmp_path / run / "ckpt" / iter_name(STEPS)), str(tmp_path / out))[0]
        for run, out in (("tp4", "hf-tp4"), ("ref", "hf-ref"))
    ]
    assert exported[0] == exported[1] and exported[0]
