"""One-rank model building for the GPU tests (NCCL process group of one, TE layer spec)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from megatron_llmjp.config.loader import build_config


@pytest.fixture
def single_rank(monkeypatch) -> Iterator[Callable]:
    """``build(overrides) -> (cfg, chunks)``: the initialised model chunks of one rank, as
    ``training.trainer`` builds them; the process group is torn down after the test."""
    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.models.init import initialize_weights
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.parallel.layout import make_layout
    from tests.helpers.spawn import free_port

    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    live = []

    def build(overrides: list[str]):
        if live:
            dist.destroy_distributed()
            live.clear()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        cfg = build_config(overrides=["data.synthetic=true", *overrides])
        layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
        dist.init_distributed(dist.RankInfo(0, 0, 1, "single"), layout, 5)
        live.append(True)
        dist.seed_everything(cfg.train.seed)
        chunks = build_model_chunks(cfg, layout)
        initialize_weights(chunks, cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
        return cfg, chunks

    yield build
    if live:
        dist.destroy_distributed()
