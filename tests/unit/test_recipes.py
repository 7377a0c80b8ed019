"""Every shipped config loads, validates, and fits its intended world size."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.parallel.layout import make_layout

REPO = Path(__file__).resolve().parents[2]

# config file -> (world size it is written for, expected derived dp)
RECIPES = {
    "configs/abci3/llm-jp-4-8b_32node_bf16.yaml": (256, 256),
    "configs/abci3/llm-jp-4-33b_32node_bf16.yaml": (256, 64),
    "configs/abci3/llm-jp-4-32b-a3b_32node_bf16.yaml": (256, 256),
    "configs/abci3/llm-jp-4-332b-a31b_64node_bf16.yaml": (512, 64),
}


def test_every_config_is_covered():
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    others = {s for s in shipped if s.startswith(("configs/mixtures/", "configs/ablations/"))}
    assert shipped - {"configs/quickstart.yaml"} - others == set(RECIPES)


def test_shipped_ablations_build_every_run_config():
    from megatron_llmjp.ablate.spec import load_spec, run_plans

    for path in sorted((REPO / "configs" / "ablations").glob("*.yaml")):
        spec = load_spec(path)
        plans = run_plans(spec, Path("/nonexistent/ablation"))
        assert set(plans) == {"init", *spec.variants}, path


def test_shipped_mixtures_parse():
    from megatron_llmjp.config.mixture_file import load_mixture

    for path in sorted((REPO / "configs" / "mixtures").glob("*.yaml")):
        mixture = load_mixture(path)
        assert "pretrain" in mixture.stages and mixture.stages["pretrain"].mix


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_recipe_layout(path, monkeypatch):
    monkeypatch.chdir(REPO)
    world, dp = RECIPES[path]
    cfg = build_config(REPO / path)
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, world)
    assert layout.dp == dp
    assert cfg.precision.dtype == "bf16"
    assert cfg.train.seq_length == 4096
    assert cfg.checkpoint.dir and cfg.checkpoint.interval == 1000 and cfg.checkpoint.async_save


def test_quickstart_config_is_a_real_parallel_layout(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = build_config(REPO / "configs/quickstart.yaml")
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 4)
    assert (layout.tp, layout.pp, layout.ep) == (2, 2, 2)
    assert cfg.model.is_moe and not cfg.data.synthetic
