"""Numerics regression: fixed-seed single-process losses against a committed golden file.

A change that should not move numerics (refactors, data plumbing, compatibility fixes) must
reproduce these curves. Regenerate deliberately with ``LLMJP_UPDATE_GOLDEN=1 pytest
tests/distributed/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "losses.json"
CASES = {
    "llm-jp-4-tiny-dense": [],
    # Router aux and z-losses on: their gradients are part of the golden curve.
    "llm-jp-4-tiny-moe": [],
    "llm-jp-4-tiny-moe-bf16": ["precision.dtype=bf16"],
}
TOLERANCE = {"fp32": 2e-5, "bf16": 2e-3}


def _losses(model: str, extra: list[str], out_dir: str) -> list[float]:
    from megatron_llmjp.training.trainer import run

    overrides = [
        f"model.name={model}",
        "model.vocab_size=1000",
        "data.synthetic=true",
        "train.iters=6",
        "train.seq_length=64",
        "train.global_batch_size=8",
        "schedule.warmup_iters=2",
        "optim.lr=1e-3",
        "logging.tensorboard=false",
        f"output_dir={out_dir}",
        *extra,
    ]
    return [r["loss"] for r in run(build_config(overrides=overrides)).history]


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_match_golden(case, tmp_path):
    model = case.removesuffix("-bf16")
    got = spawn(_losses, 1, model, CASES[case], str(tmp_path))[0]
    if os.environ.get("LLMJP_UPDATE_GOLDEN"):
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[case] = got
        GOLDEN.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        pytest.skip(f"golden losses for {case} rewritten")
    golden = json.loads(GOLDEN.read_text())[case]
    tol = TOLERANCE["bf16" if case.endswith("bf16") else "fp32"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, golden, strict=True))
    assert rel < tol, f"{case}: losses {got} vs golden {golden} (max rel diff {rel:.2e})"
