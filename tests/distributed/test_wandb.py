"""Weights & Biases logging in offline mode on CPU, read back from the run's own ``.wandb``
transaction log: the TensorBoard scalars, the resolved config, one run id across a resume."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
wandb = pytest.importorskip("wandb")


def _records(path: Path):
    """wandb's protobuf ``Record``s of a ``run-ID.wandb`` file (a LevelDB-style log: a 7-byte
    ``:W&B`` header, then 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _read_run(path: Path) -> tuple[str, str, dict, dict[int, dict]]:
    """(run id, display name, config, {step: scalars}) of one offline run file."""
    run_id, name, config, history = "", "", {}, {}
    for rec in _records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id, name = rec.run.run_id, rec.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item
            }
            history[rec.history.step.num] = {
                k: v for k, v in items.items() if k.startswith("train/")
            }
    return run_id, name, config, history


def _train(overrides: list[str]) -> None:
    from megatron_llmjp.training.trainer import run

    run(build_config(overrides=overrides))


def test_wandb_offline_run_resumes_the_same_run(tmp_path):
    out = tmp_path / "run"
    base = [
        "model.name=llm-jp-4-tiny-dense",
        "data.synthetic=true",
        "train.seq_length=32",
        "train.global_batch_size=2",
        "logging.gpu_telemetry=false",
        "logging.tensorboard=false",
        "logging.wandb_project=llmjp-test",
        "logging.wandb_run_name=tiny",
        "logging.wandb_mode=offline",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        f"output_dir={out}",
    ]
    spawn(_train, 1, [*base, "train.iters=2"])
    spawn(_train, 1, [*base, "train.iters=3"])  # resumes at iteration 2

    run_id = (out / "wandb_run_id").read_text().strip()
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    runs = [_read_run(f) for f in files]
    assert [r[0] for r in runs] == [run_id, run_id]
    assert runs[0][1] == "tiny"
    config = runs[0][2]
    assert config["model"]["name"] == "llm-jp-4-tiny-dense"
    assert config["logging"]["wandb_mode"] == "offline"
    history = {**runs[0][3], **runs[1][3]}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        logged = history[m["step"]]
        assert "train/loss" in logged, runs
        assert logged["train/loss"] == pytest.approx(m["loss"], rel=1e-12)
        assert {"train/lr", "train/grad_norm", "train/time_optimizer"} <= set(logged)
