"""Shared test setup: which device the session runs on, and the CPU compatibility layer.

``pytest`` (any selection that is not only GPU tests) runs on CPU with gloo and megatron-core's
local layer spec, even on a GPU node: ``LLMJP_DEVICE=cpu`` is set and the CPU layer installed
before anything imports megatron-core, so the forked multi-rank workers (tests/helpers/spawn.py)
inherit it, and nothing asks CUDA anything before they fork. ``pytest -m gpu`` runs only the
GPU tests (tests/gpu) with ``LLMJP_DEVICE=cuda``; they are skipped without CUDA.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from megatron_llmjp.parallel import cpu_compat

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


_GPU_RUN = pytest.StashKey[bool]()


def selects_only_gpu_tests(markexpr: str) -> bool:
    """Whether the ``-m`` expression selects GPU tests and nothing else: it holds for some
    test marked ``gpu`` and for no test without that marker, whatever other markers (``slow``,
    ``distributed``, ...) it carries. True for ``gpu`` or ``gpu and not slow``; False for
    ``not slow``, ``gpu or slow``, ``gpu or not gpu``, an empty or an unparsable expression."""
    tokens = re.findall(r"[()]|[^\s()]+", markexpr)
    names = sorted({t for t in tokens if t not in ("(", ")", "and", "or", "not")} - {"gpu"})

    def holds(true: set[str]) -> bool:
        words = [t if t in ("(", ")", "and", "or", "not") else str(t in true) for t in tokens]
        return bool(eval(" ".join(words), {"__builtins__": {}}, {}))  # only True/False/ops

    # Every combination of the other markers a test may carry (a handful of names).
    others = [{n for i, n in enumerate(names) if mask >> i & 1} for mask in range(2 ** len(names))]
    try:
        return any(holds(o | {"gpu"}) for o in others) and not any(holds(o) for o in others)
    except (SyntaxError, TypeError):
        return False


def pytest_configure(config):
    gpu_run = selects_only_gpu_tests(config.getoption("markexpr") or "")
    os.environ[cpu_compat.DEVICE_ENV] = "cuda" if gpu_run else "cpu"
    config.stash[_GPU_RUN] = gpu_run
    if not gpu_run:
        # Installing imports megatron-core, whose import-time deprecation notices would print
        # outside pytest's warning capture (the filters installed here last as long as they
        # did when this ran at conftest import, inside that capture).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cpu_compat.install()


def pytest_collection_modifyitems(config, items):
    if not config.stash[_GPU_RUN]:
        skip = pytest.mark.skip(reason="GPU test: run the GPU tests alone with `pytest -m gpu`")
    elif not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (a GPU machine with Transformer Engine)")
    else:
        return
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
