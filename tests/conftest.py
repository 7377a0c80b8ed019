"""Shared test setup: the CPU compatibility layer goes in before anything imports megatron-core,
so the forked multi-rank workers (tests/helpers/spawn.py) inherit it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_llmjp.parallel import cpu_compat

cpu_compat.install()
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a GPU machine with Transformer Engine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (clone next to ../shared)")
    return SHARED_DATA
