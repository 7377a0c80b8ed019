"""Indexed datasets as the trainer reads them: stage sizing on resume, and ``.bin`` files that
disagree with their ``.idx`` found before any process group exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron_llmjp.config.loader import ConfigError, build_config

VOCAB = 1000


def make_dataset(prefix: Path, docs: int = 200, seed: int = 0) -> str:
    """A small megatron indexed dataset of random documents (EOD = VOCAB, NullTokenizer's)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    for _ in range(docs):
        ids = rng.integers(0, VOCAB, int(rng.integers(5, 40))).tolist()
        builder.add_document([*ids, VOCAB], [len(ids) + 1])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.fixture
def group(tmp_path: Path):
    """megatron-core's dataset builder needs a process group: one gloo rank."""
    import torch

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def mixture(tmp_path: Path) -> Path:
    a = make_dataset(tmp_path / "data" / "a", seed=1)
    b = make_dataset(tmp_path / "data" / "b", seed=2)
    path = tmp_path / "mix.yaml"
    path.write_text(
        f"sources:\n  a: {a}\n  b: {b}\nstages:\n  pretrain:\n"
        "    mix: {a: {weight: 0.5}, b: {weight: 0.5}}\n"
    )
    return path


def _cfg(mixture: Path, tmp_path: Path, *extra: str):
    return build_config(
        overrides=[
            "model.name=llm-jp-4-tiny-dense",
            f"data.mixture={mixture}",
            f"data.null_tokenizer_vocab_size={VOCAB}",
            "train.seq_length=16",
            "train.micro_batch_size=1",
            "logging.tensorboard=false",
            *extra,
        ],
        output_dir=str(tmp_path / "run"),
    )


def test_resume_with_a_smaller_global_batch_reads_every_step(mixture, tmp_path, group):
    """8 samples per step for 2 steps, then resumed at 4 per step up to iteration 4: the stage
    must hold 16 + 2 x 4 = 24 samples, and the samples already read stay where they were."""
    from megatron_llmjp.data.sampler import build_data, stage_samples

    first = build_data(_cfg(mixture, tmp_path, "train.global_batch_size=8", "train.iters=4"), 0, 1)
    cfg = _cfg(mixture, tmp_path, "train.global_batch_size=4", "train.iters=4")
    assert stage_samples(4, 4, iteration=2, consumed=16) == 24
    data = build_data(cfg, 0, 1, stage_start=0, iteration=2, stage_consumed=16)
    data.train.resume_at(2, 16)
    assert len(data.train.sampler.dataset) >= 24
    for step in (2, 3):
        batch = data.train.microbatches(step)
        assert len(batch) == 4
    # The blend is the same sample order for any size: step 2 at 4/step is samples 16..19.
    again = build_data(_cfg(mixture, tmp_path, "train.global_batch_size=8", "train.iters=4"), 0, 1)
    want = again.train.sampler.dataset[16]["tokens"]
    assert np.array_equal(np.asarray(data.train.sampler.dataset[16]["tokens"]), np.asarray(want))
    assert len(first.train.sampler.dataset) >= 32


def test_stage_token_budget_counts_the_consumed_samples(tmp_path, group):
    """A budget of 20 samples: a resume at iteration 2 after 16 samples, with 2 steps of 4
    left, needs 24 and is refused with the numbers (the old formula asked for 16 only)."""
    from megatron_llmjp.data.sampler import build_data

    a = make_dataset(tmp_path / "data" / "a")
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        f"sources:\n  a: {a}\nstages:\n  s:\n    tokens: 320\n    mix: {{a: {{weight: 1}}}}\n"
    )
    cfg = _cfg(mix, tmp_path, "train.global_batch_size=4", "train.iters=4")
    build_data(cfg, 0, 1)  # 16 samples from the start: within the budget
    with pytest.raises(ConfigError, match=r"needs 24"):
        build_data(cfg, 0, 1, iteration=2, stage_consumed=16)
    # A finished stage that used its whole budget (5 steps of 4) reopens without complaint.
    done = _cfg(mix, tmp_path, "train.global_batch_size=4", "train.iters=5")
    build_data(done, 0, 1, iteration=5, stage_consumed=20)


def _truncate(prefix: str, drop: int = 8) -> tuple[int, int]:
    path = Path(prefix + ".bin")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - drop)
    return size, size - drop


def test_truncated_bin_is_named_with_sizes_by_every_reader(mixture, tmp_path, capsys):
    """The trainer's preflight, ``llmjp-mixture plan`` and the natural-token count all refuse a
    ``.bin`` shorter than its ``.idx`` says, naming the file and both sizes."""
    from megatron_llmjp.cli.mixture import main as mixture_main
    from megatron_llmjp.data.mixture import check_datasets, check_indexed, natural_tokens

    prefix = str(tmp_path / "data" / "a")
    tokens = check_indexed(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert tokens == int(IndexedDataset(prefix).sequence_lengths.sum())
    want, actual = _truncate(prefix)
    message = rf"{prefix}\.bin is {actual:,} bytes but a\.idx describes {want:,} bytes"
    with pytest.raises(ConfigError, match=message):
        check_datasets(mixture, None)
    with pytest.raises(ConfigError, match=message):
        natural_tokens(prefix)
    assert mixture_main(["plan", str(mixture)]) == 2
    assert f"{prefix}.bin is {actual:,} bytes" in capsys.readouterr().err


def test_preflight_refuses_a_truncated_bin_before_any_process_group(mixture, tmp_path):
    import torch

    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    _truncate(str(tmp_path / "data" / "b"), drop=1)
    cfg = _cfg(mixture, tmp_path, "train.global_batch_size=4", "train.iters=4")
    with pytest.raises(ConfigError, match=r"b\.bin is .* bytes but b\.idx describes"):
        check_runtime(cfg, RankInfo(rank=0, local_rank=0, world_size=1, source="single"))
    assert not torch.distributed.is_initialized()


def test_idx_that_disagrees_with_its_header_is_refused(tmp_path):
    from megatron_llmjp.data.mixture import check_indexed

    prefix = make_dataset(tmp_path / "c", docs=10)
    idx = Path(prefix + ".idx")
    idx.write_bytes(idx.read_bytes()[:-4])
    with pytest.raises(ConfigError, match=r"c\.idx is .* bytes but its header describes 10"):
        check_indexed(prefix)
