"""Training on megatron indexed datasets blended by a mixture stage (real tokenizer and corpus).

The datasets, blend and sample order come from megatron-core's ``BlendedMegatronDatasetBuilder``
and ``GPTDataset``; these tests check what the trainer makes of them: shares, determinism,
validation loss, exact resume and the switch to a new stage.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from megatron_llmjp.config.loader import build_config
from tests.helpers.corpus import TOKENIZER, build_sources, write_mixture
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

STAGES = """\
  pretrain:
    mix:
      ja: {multiplier: 4.5}
      en: {multiplier: 1}
      qa: {weight: 0.2}
  midtrain:
    mix:
      en: {weight: 0.5}
      qa: {weight: 0.5}
"""


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, request):
    if not TOKENIZER.is_dir():
        pytest.skip(f"shared data not found at {TOKENIZER}")
    root = tmp_path_factory.mktemp("mixture")
    return write_mixture(root / "mix.yaml", build_sources(root / "data"), STAGES)


def _overrides(mixture, out, *extra) -> list[str]:
    return [
        "model.name=llm-jp-4-tiny-dense",
        f"data.mixture={mixture}",
        f"data.tokenizer={TOKENIZER}",
        "data.stage=pretrain",
        "train.seq_length=64",
        "train.global_batch_size=8",
        "train.iters=6",
        "schedule.warmup_iters=1",
        "logging.tensorboard=false",
        f"output_dir={out}",
        *extra,
    ]


def _samples(overrides: list[str], n: int) -> dict:
    """Build the data as the trainer does (one rank) and report the first ``n`` samples."""
    from megatron_llmjp.config.mixture_file import load_mixture
    from megatron_llmjp.data.mixture import shares
    from megatron_llmjp.data.sampler import build_data

    cfg = build_config(overrides=overrides)
    import torch

    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        data = build_data(cfg, 0, 1)
        ds = data.train.sampler.dataset
        ids = np.asarray(ds.dataset_index[:n])
        names = [d.dataset_path.rsplit("/", 1)[1] for d in ds.datasets]
        from megatron_llmjp.data.mixture import natural_tokens

        mix = load_mixture(cfg.data.mixture)
        stage = mix.stage(cfg.data.stage)
        want = shares(stage, {m.name: natural_tokens(mix.sources[m.name]) for m in stage.mix})
        got = {names[i]: float((ids == i).mean()) for i in range(len(names))}
        first = [ds[i]["tokens"][:16].tolist() for i in range(4)]
        return {"want": want, "got": got, "first": first}
    finally:
        torch.distributed.destroy_process_group()


def test_blend_matches_the_requested_shares_and_is_deterministic(mixture, tmp_path):
    n = 4000
    over = _overrides(mixture, tmp_path / "a", "train.iters=500")
    a = spawn(_samples, 1, over, n)[0]
    for name, share in a["want"].items():
        assert abs(a["got"][name] - share) < 0.01, (name, a["got"], a["want"])
    assert a["want"]["qa"] == pytest.approx(0.2)
    b = spawn(_samples, 1, _overrides(mixture, tmp_path / "b", "train.iters=500"), n)[0]
    assert a["first"] == b["first"]  # same seed, fresh cache: same samples
    c = spawn(_samples, 1, [*over, "data.seed=7", f"data.cache_dir={tmp_path / 'c'}"], n)[0]
    assert a["first"] != c["first"]


def _train(overrides: list[str]) -> dict:
    from megatron_llmjp.training.trainer import run

    result = run(build_config(overrides=overrides))
    return {
        "loss": [r["loss"] for r in result.history],
        "valid": [r.get("valid_loss") for r in result.history],
        "progress": result.progress.__dict__,
    }


def test_training_on_the_mixture_logs_validation_loss(mixture, tmp_path):
    got = spawn(_train, 2, _overrides(mixture, tmp_path, "train.eval_interval=3"))[-1]
    assert all(math.isfinite(x) for x in got["loss"])
    assert got["valid"][2] is not None and got["valid"][5] is not None
    assert got["valid"][0] is None
    assert got["valid"][5] < got["valid"][2]  # held-out loss falls as training proceeds
    assert got["progress"]["data_stage"] == "pretrain"
    assert got["progress"]["stage_consumed_samples"] == 48


def test_resume_on_the_mixture_is_exact_and_a_new_stage_starts_fresh(mixture, tmp_path):
    # A constant LR makes the schedule independent of train.iters, so 3 + 3 steps can be
    # compared with 6 straight ones bitwise.
    const = "schedule.style=constant"
    ckpt = f"checkpoint.dir={tmp_path / 'ckpt'}"
    straight = spawn(_train, 2, _overrides(mixture, tmp_path / "s", const))[-1]
    first = spawn(_train, 2, _overrides(mixture, tmp_path / "a", const, ckpt, "train.iters=3"))[-1]
    second = spawn(_train, 2, _overrides(mixture, tmp_path / "b", const, ckpt))[-1]
    assert first["loss"] + second["loss"] == straight["loss"]
    assert second["progress"]["stage_consumed_samples"] == 48
    # Resumed with a smaller global batch: the stage holds the 48 samples read plus 2 x 4.
    shutil.copytree(tmp_path / "ckpt", tmp_path / "ckpt4")
    small = _overrides(mixture, tmp_path / "c", const, f"checkpoint.dir={tmp_path / 'ckpt4'}")
    smaller = spawn(_train, 2, [*small, "train.global_batch_size=4", "train.iters=8"])[-1]
    assert len(smaller["loss"]) == 2 and all(math.isfinite(x) for x in smaller["loss"])
    assert smaller["progress"]["stage_consumed_samples"] == 56
    mid_over = _overrides(mixture, tmp_path / "m", const, ckpt, "data.stage=midtrain")
    mid = spawn(_train, 2, [*mid_over, "train.iters=8"])[-1]
    assert mid["progress"]["data_stage"] == "midtrain"
    assert mid["progress"]["stage_start_iteration"] == 6
    assert mid["progress"]["stage_consumed_samples"] == 16
    assert mid["progress"]["consumed_samples"] == 64
