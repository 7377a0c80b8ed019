"""Shared test setup: the CPU compatibility layer goes in before anything imports megatron-core,
so the forked multi-rank workers (tests/helpers/spawn.py) inherit it."""

from __future__ import annotations

import hashlib
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


@pytest.fixture
def mlm(shared_data):
    """The data set's root; after the test, every input still has its published hash."""
    root = shared_data / "megatron-lm"
    if not (root / "SHA256SUMS").is_file():
        pytest.skip(f"{root} not found")
    yield root
    assert_unchanged(root)


def assert_unchanged(root: Path) -> None:
    """Every file listed in the data set's SHA256SUMS still has its published hash."""
    for line in (root / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = root / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} was modified"
