"""End-to-end training on CPU/gloo: real megatron-core models, real tokenizer, real outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.models.params import count_parameters
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]


def _count_real_parameters(model: str) -> tuple[int, int]:
    """Build the registry model with megatron-core on one rank; (counted, predicted)."""
    from megatron_llmjp.models.build import build_model_chunks, model_vocab_size
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.parallel.layout import make_layout

    cfg = build_config(overrides=[f"model.name={model}", "data.synthetic=true"])
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
    dist.init_distributed(dist.discover_ranks(), layout, 5)
    try:
        chunks = build_model_chunks(cfg, layout)
        real = sum(p.numel() for c in chunks for p in c.parameters())
        predicted = count_parameters(cfg.model, vocab_size=model_vocab_size(cfg, layout)).total
        return real, predicted
    finally:
        dist.destroy_distributed()


@pytest.mark.parametrize("model", ["llm-jp-4-tiny-dense", "llm-jp-4-tiny-moe"])
def test_param_counter_matches_megatron_model(model):
    real, predicted = spawn(_count_real_parameters, 1, model)[0]
    assert real == predicted


def _count_unique_shards(overrides: list[str]) -> tuple[int, int]:
    """Elements this rank owns uniquely (replica 0 of each shard), and the counter's total."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_llmjp.models.build import build_model_chunks, model_vocab_size
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training.trainer import check_runtime

    cfg = build_config(overrides=["data.synthetic=true", *overrides])
    info = dist.discover_ranks()
    layout = check_runtime(cfg, info).layout
    dist.init_distributed(info, layout, 5)
    try:
        owned = 0
        for chunk in build_model_chunks(cfg, layout):
            params = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
            for item in nested_values(chunk.sharded_state_dict()):
                shards = item.build() if isinstance(item, ShardedTensorFactory) else [item]
                for sh in nested_values(shards) if isinstance(shards, dict) else shards:
                    if not isinstance(sh, ShardedTensor):
                        continue
                    replica = (
                        sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
                    )
                    is_param = sh.data.untyped_storage().data_ptr() in params
                    if is_param and all(r == 0 for r in replica):
                        owned += sh.data.numel()
        predicted = count_parameters(cfg.model, vocab_size=model_vocab_size(cfg, layout)).total
        return owned, predicted
    finally:
        dist.destroy_distributed()


@pytest.mark.parametrize(
    "world,overrides",
    [
        (4, ["model.name=llm-jp-4-tiny-moe", "parallel.tp=2", "parallel.pp=2", "parallel.ep=2"]),
        (4, ["model.name=llm-jp-4-tiny-dense", "parallel.pp=2", "parallel.vpp=2"]),
        (4, ["model.name=llm-jp-4-tiny-moe", "parallel.ep=4"]),
    ],
)
def test_sharded_parameters_add_up_to_the_counter(world, overrides):
    """Across ranks, the uniquely owned shards of a parallel layout sum to the counted total."""
    results = spawn(_count_unique_shards, world, overrides)
    assert sum(owned for owned, _ in results) == results[0][1]


# A short BF16 run on synthetic data with a learning rate high enough to fall visibly.
_BF16_RUN = [
    "model.vocab_size=1000",
    "data.synthetic=true",
    "precision.dtype=bf16",
    "train.iters=12",
    "train.seq_length=64",
    "optim.lr=3e-3",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
]


def _train(overrides: list[str]) -> list[dict]:
    from megatron_llmjp.training.trainer import run

    return run(build_config(overrides=overrides)).history


def test_bf16_moe_trains(tmp_path):
    """BF16 (FP32 master weights in the distributed optimizer) with EP2: finite, falling loss."""
    overrides = ["model.name=llm-jp-4-tiny-moe", "parallel.ep=2", *_BF16_RUN]
    history = spawn(_train, 2, [*overrides, f"output_dir={tmp_path}"])[-1]
    losses = [r["loss"] for r in history]
    assert all(math.isfinite(x) for x in losses)
    assert all(math.isfinite(r["grad_norm"]) for r in history)
    # Router losses are reported unscaled: near 1 (balanced) and near ln(8)^2 at the start.
    assert 0.5 < history[0]["moe_load_balancing_loss"] < 2.0
    assert 0.0 < history[0]["moe_z_loss"] < 50.0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


def test_bf16_dense_tp2_pp2_trains(tmp_path):
    overrides = ["model.name=llm-jp-4-tiny-dense", "parallel.tp=2", "parallel.pp=2", *_BF16_RUN]
    losses = [r["loss"] for r in spawn(_train, 4, [*overrides, f"output_dir={tmp_path}"])[-1]]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


def test_text_run_writes_metrics_tensorboard_and_config(tmp_path, shared_data):
    """Real tokenizer and corpus with TP2: metrics.jsonl, TensorBoard events, resolved config."""
    overrides = [
        "model.name=llm-jp-4-tiny-dense",
        "parallel.tp=2",
        "train.iters=3",
        "train.seq_length=64",
        "train.global_batch_size=4",
        "data.max_bytes_per_file=200000",
        f"data.tokenizer={shared_data / 'tokenizer/llm-jp-tokenizer-v4.0'}",
        f"data.text_files=[{shared_data / 'corpus/ja-jnli-v1.1-train.txt'}]",
        f"output_dir={tmp_path}",
    ]
    spawn(_train, 2, overrides)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(r)
        # An untrained model over 196,608 tokens starts near ln(V) = 12.2.
        assert 10.0 < r["loss"] < 13.0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["model"]["num_query_groups"] == 2
    assert resolved["parallel"]["tp"] == 2
    again = build_config(tmp_path / "config.yaml")
    assert again == build_config(overrides=overrides)


@pytest.mark.slow
def test_torchrun_entry_point_quickstart(tmp_path, shared_data):
    """The README's main job through torchrun (4 processes, TP2 x PP2 x EP2), shortened, then
    launched again with more iterations: the second launch resumes from the first's checkpoint,
    which ``--output-dir`` put in this test's directory (never runs/quickstart/checkpoints)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The documented data command, into this test's directory; the mixture points there.
    data = tmp_path / "data"
    build = [sys.executable, "tools/data/quickstart_corpus.py", "--out", str(data)]
    subprocess.run(build, cwd=REPO, check=True, capture_output=True, timeout=600)
    mixture = tmp_path / "mixture.yaml"
    text = (REPO / "configs/mixtures/quickstart.yaml").read_text()
    mixture.write_text(text.replace("runs/data/quickstart", str(data)))

    def launch(iters: int) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            str(_free_port()),
            "-m",
            "megatron_llmjp.cli.train",
            "--config",
            "configs/quickstart.yaml",
            "--output-dir",
            str(tmp_path),
        ]
        for o in (
            f"train.iters={iters}",
            "logging.interval=1",
            "checkpoint.interval=3",
            f"data.mixture={mixture}",
            "train.eval_interval=3",
        ):
            cmd += ["--set", o]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    shared = REPO / "runs" / "quickstart" / "checkpoints"
    before = sorted(p.name for p in shared.glob("*"))
    launch(6)
    assert sorted(p.name for p in shared.glob("*")) == before
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["valid_loss"] < records[2]["valid_loss"]
    # configs/quickstart.yaml's checkpoint.dir is relative: in the run's --output-dir.
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*")) == [
        "iter_0000003",
        "iter_0000006",
    ]
    second = launch(8)
    assert "at iteration 6" in second.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8]


def _free_port() -> int:
    from tests.helpers.spawn import free_port

    return free_port()
