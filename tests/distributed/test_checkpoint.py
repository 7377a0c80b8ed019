"""Checkpoints through the real trainer on CPU/gloo: exact resume, resharding, async saves,
bad checkpoints and non-finite steps.

Runs use FP32 and synthetic tokens; each run is a fresh set of forked ranks
(``tests/helpers/spawn.py``), so a resume really starts from what is on disk.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from megatron_llmjp.checkpoint.store import CheckpointError, read_latest
from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

BASE = [
    "data.synthetic=true",
    "model.vocab_size=1000",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "train.iters=6",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
]
DENSE = ["model.name=llm-jp-4-tiny-dense"]
MOE = ["model.name=llm-jp-4-tiny-moe", "model.moe_aux_loss_coeff=0", "model.moe_z_loss_coeff=0"]


def _train(overrides: list[str]) -> dict:
    from megatron_llmjp.training.trainer import run

    result = run(build_config(overrides=BASE + overrides))
    return {
        "loss": [r["loss"] for r in result.history],
        "grad_norm": [r["grad_norm"] for r in result.history],
        "lr": [r["lr"] for r in result.history],
        "skipped": [r["skipped"] for r in result.history],
        "iteration": result.progress.iteration,
        "skipped_steps": result.progress.skipped_steps,
    }


def train(world: int, overrides: list[str], out: Path) -> dict:
    """Run on ``world`` ranks; returns the logging rank's curves."""
    return spawn(_train, world, [*overrides, f"output_dir={out}"])[-1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted 6-step runs per (model, layout), computed once."""
    cache: dict = {}

    def get(world: int, overrides: list[str]) -> dict:
        overrides = [o for o in overrides if not o.startswith("checkpoint.")]
        key = (world, tuple(overrides))
        if key not in cache:
            cache[key] = train(world, overrides, tmp_path_factory.mktemp("straight"))
        return cache[key]

    return get


FULLY_RESHARDABLE = "checkpoint.optimizer_sharding=fully_reshardable"

# The distributed optimizer's state in checkpoint.optimizer_sharding's default form,
# dp_reshardable, unless an entry sets the other form.
RESUME = [
    ("single", 1, DENSE),
    ("tp2xpp2", 4, [*DENSE, "parallel.tp=2", "parallel.pp=2"]),
    ("ep2", 2, [*MOE, "parallel.ep=2"]),
    ("dp2-async", 2, [*DENSE, "checkpoint.async_save=true", "checkpoint.interval=2"]),
    ("dp2-no-distopt", 2, [*DENSE, "optim.use_distributed_optimizer=false"]),
    ("bf16-ep2", 2, [*MOE, "parallel.ep=2", "precision.dtype=bf16"]),
    ("dp2-fully-reshardable", 2, [*DENSE, FULLY_RESHARDABLE]),
]


def assert_optimizer_form(checkpoint: Path, overrides: list[str]) -> None:
    """The manifest and megatron-core's own record of the save (its content metadata and
    stored keys) agree on the distributed optimizer's form the run was configured with."""
    from megatron.core.dist_checkpointing import load_content_metadata

    from megatron_llmjp.checkpoint.tensors import TensorReader

    distributed = "optim.use_distributed_optimizer=false" not in overrides
    form = "fully_reshardable" if FULLY_RESHARDABLE in overrides else "dp_reshardable"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["optimizer"]["sharding"] == (form if distributed else None)
    if not distributed:
        return
    assert load_content_metadata(str(checkpoint))["distrib_optim_sharding_type"] == form
    # dp_reshardable stores the buffers of each tp-pp group (megatron-core's key
    # optimizer.distributed.dp_group_idx_<rank>.gbuf_idx_<i>.dtype_<dtype>.bucket_idx_<j>.<state>,
    # behind chained_<k>. for chained dense and expert optimizers); fully_reshardable stores the
    # state per parameter under optimizer.state.<state>.<key>.
    names = list(TensorReader(checkpoint).names())
    bucket = re.compile(r"(chained_\d+\.)?optimizer\.distributed\.dp_group_idx_\d+\.gbuf_idx_\d+\.")
    buffers = [n for n in names if bucket.match(n)]
    per_param = [n for n in names if n.startswith("optimizer.state.exp_avg.")]
    assert (bool(buffers), bool(per_param)) == (form == "dp_reshardable", form != "dp_reshardable")


@pytest.mark.parametrize("name,world,overrides", RESUME, ids=[r[0] for r in RESUME])
def test_resume_is_bitwise_exact(name, world, overrides, straight, tmp_path):
    ref = straight(world, overrides)
    ckpt = f"checkpoint.dir={tmp_path / 'ckpt'}"
    first = train(world, [*overrides, ckpt, "train.iters=3"], tmp_path / "a")
    # Same train.iters as the straight run, so the LR schedule is the same function.
    assert read_latest(tmp_path / "ckpt") == 3
    assert_optimizer_form(tmp_path / "ckpt" / "iter_0000003", overrides)
    second = train(world, [*overrides, ckpt], tmp_path / "b")
    assert first["iteration"] == 3 and second["iteration"] == 6
    for key in ("loss", "grad_norm"):
        assert first[key] + second[key] == ref[key], f"{name}: {key} differs after resume"
    assert ref["loss"][-1] < ref["loss"][0]


def test_resume_applies_the_new_learning_rate(tmp_path):
    """The loaded optimizer state carries the saving run's max_lr/min_lr in its parameter
    groups; the resumed run must follow the schedule of its own config (distributed optimizer,
    DP2)."""
    from megatron_llmjp.training.lr_schedule import learning_rate

    overrides = [*DENSE, f"checkpoint.dir={tmp_path / 'ckpt'}"]
    first = train(2, [*overrides, "train.iters=3"], tmp_path / "a")
    new = ["optim.lr=1e-4", "optim.min_lr=1e-5", "optim.weight_decay=0.01"]
    second = train(2, [*overrides, *new], tmp_path / "b")
    cfg = build_config(overrides=BASE + DENSE + new)
    gbs = cfg.train.global_batch_size
    want = [
        learning_rate(k * gbs, cfg.optim, cfg.schedule, cfg.train.iters, gbs) for k in (3, 4, 5)
    ]
    assert second["lr"] == pytest.approx(want, rel=1e-12)
    assert first["lr"][-1] == 3e-4  # the saving run's peak (optim.lr default)


FR = FULLY_RESHARDABLE
RESHARD = [
    # (name, model, save layout, load layout): worlds follow from the layouts. A change of tp,
    # pp, vpp or ep needs the fully_reshardable form; the resumed runs keep the default form
    # in their config, so their loads also show that a load reads the form that was saved.
    ("tp2xpp2-to-single", DENSE, (4, ["parallel.tp=2", "parallel.pp=2", FR]), (1, [])),
    (
        "tp2xpp2-to-pp2xdp2",
        DENSE,
        (4, ["parallel.tp=2", "parallel.pp=2", FR]),
        (4, ["parallel.pp=2"]),
    ),
    ("pp2-to-vpp", DENSE, (2, ["parallel.pp=2", FR]), (2, ["parallel.pp=2", "parallel.vpp=2"])),
    ("ep2-to-ep4", MOE, (2, ["parallel.ep=2", FR]), (4, ["parallel.ep=4"])),
    ("ep2-to-ep2xtp2", MOE, (2, ["parallel.ep=2", FR]), (4, ["parallel.ep=2", "parallel.tp=2"])),
    # dp_reshardable: the data-parallel size alone changes (dense, with PP, and MoE where the
    # dense DP goes 2 -> 4 and the expert DP 1 -> 2).
    ("dp2-to-single-dp-reshardable", DENSE, (2, []), (1, [])),
    ("pp2-to-pp2xdp2-dp-reshardable", DENSE, (2, ["parallel.pp=2"]), (4, ["parallel.pp=2"])),
    ("ep2-to-ep2xdp4-dp-reshardable", MOE, (2, ["parallel.ep=2"]), (4, ["parallel.ep=2"])),
]


@pytest.mark.parametrize("name,model,save,load", RESHARD, ids=[r[0] for r in RESHARD])
def test_resume_into_another_layout(name, model, save, load, straight, tmp_path):
    """The first step after loading is a forward pass of the loaded weights on the batch the
    straight run saw at that step: same loss. Later steps use the resharded optimizer state."""
    (w_save, o_save), (w_load, o_load) = save, load
    ref = straight(w_save, [*model, *o_save])
    ckpt = f"checkpoint.dir={tmp_path / 'ckpt'}"
    train(w_save, [*model, *o_save, ckpt, "train.iters=3"], tmp_path / "a")
    assert_optimizer_form(tmp_path / "ckpt" / "iter_0000003", o_save)
    resumed = train(w_load, [*model, *o_load, ckpt], tmp_path / "b")
    for key in ("loss", "grad_norm"):
        got, want = resumed[key], ref[key][3:]
        rel = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
        assert rel < 1e-5, f"{name}: {key} {got} vs straight {want} (rel {rel:.1e})"


def test_weights_only_load_starts_at_zero(straight, tmp_path):
    ref = straight(1, DENSE)
    train(1, [*DENSE, f"checkpoint.dir={tmp_path / 'a'}", "train.iters=3"], tmp_path / "ra")
    got = train(
        1,
        [
            *DENSE,
            f"checkpoint.load={tmp_path / 'a'}",
            "checkpoint.load_optimizer=false",
            "train.iters=2",
        ],
        tmp_path / "rb",
    )
    assert got["iteration"] == 2
    # Step 1 of the new run sees batch 0 with the weights after 3 steps: lower than at start.
    assert got["loss"][0] < ref["loss"][0]
    assert not math.isclose(got["loss"][0], ref["loss"][3])


def test_keep_last_prunes_older_saves(tmp_path):
    ckpt = tmp_path / "ckpt"
    overrides = [*DENSE, f"checkpoint.dir={ckpt}", "checkpoint.interval=1"]
    train(1, [*overrides, "checkpoint.keep_last=2", "train.iters=4"], tmp_path / "run")
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    assert read_latest(ckpt) == 4


# -- bad checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A published 2-step dense checkpoint root."""
    root = tmp_path_factory.mktemp("saved")
    train(1, [*DENSE, f"checkpoint.dir={root / 'ckpt'}", "train.iters=2"], root / "run")
    return root / "ckpt"


def _preflight(overrides: list[str]):
    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    return check_runtime(build_config(overrides=BASE + overrides), RankInfo(0, 0, 1, "single"))


def test_preflight_finds_the_latest_checkpoint(saved):
    plan = _preflight([*DENSE, f"checkpoint.load={saved}"]).resume
    assert plan.directory == saved / "iter_0000002"
    assert plan.manifest["iteration"] == 2 and plan.full


def test_missing_checkpoint_is_refused_before_training(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint.load: .*does not exist"):
        _preflight([*DENSE, f"checkpoint.load={tmp_path / 'nope'}"])


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    shard = sorted((copy / "iter_0000002").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name} has .* truncated"):
        _preflight([*DENSE, f"checkpoint.load={copy}"])


def test_wrong_model_shape_is_refused(saved):
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 64, config 128"):
        _preflight([*DENSE, f"checkpoint.load={saved}", "model.hidden_size=128"])


def test_corrupt_shard_fails_on_every_rank_with_the_path(saved, tmp_path):
    """Same size, garbage content: only the load itself can notice; every rank raises."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    shard = sorted((copy / "iter_0000002").glob("*.distcp"))[0]
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.raises(RuntimeError, match="CheckpointError.*loading failed"):
        train(2, [*DENSE, f"checkpoint.load={copy}"], tmp_path / "run")


def test_checkpoint_cli_info_and_verify(saved, tmp_path, capsys):
    import shutil

    from megatron_llmjp.cli.checkpoint import main

    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "iteration    2 (consumed samples 16" in out and "llm-jp-4-tiny-dense" in out
    assert main(["verify", str(saved / "iter_0000002")]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    (copy / "iter_0000002" / "common.pt").write_bytes(b"")
    assert main(["verify", str(copy)]) == 2
    assert "common.pt has 0 bytes" in capsys.readouterr().err


def test_manifest_describes_a_moe_checkpoint(tmp_path):
    overrides = [*MOE, "parallel.ep=2", "train.iters=1", "schedule.warmup_iters=0"]
    train(2, [*overrides, f"checkpoint.dir={tmp_path}"], tmp_path / "r")
    manifest = json.loads((tmp_path / "iter_0000001" / "manifest.json").read_text())
    assert manifest["iteration"] == 1 and manifest["consumed_samples"] == 8
    m = manifest["model"]
    assert m["family"] == "moe" and m["hf_architecture"] == "Qwen3MoeForCausalLM"
    assert (m["vocab_size"], m["padded_vocab_size"]) == (1000, 1024)
    assert m["moe"]["experts_layout"] == "sequential" and m["moe"]["num_experts"] == 8
    assert m["moe"]["router"]["norm_topk_prob"] is True
    assert manifest["parallel"]["ep"] == 2 and manifest["parallel"]["world"] == 2
    assert manifest["versions"]["megatron_core"] == "0.16.1"
    files = {p.name for p in (tmp_path / "iter_0000001").iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files


# -- non-finite steps ----------------------------------------------------------------------


def test_nan_loss_is_skipped_and_counted(monkeypatch, straight, tmp_path):
    ref = straight(2, DENSE)
    monkeypatch.setenv("LLMJP_FAULT", "nan_loss@3:1")
    got = train(2, [*DENSE, "fault.nonfinite=skip"], tmp_path)
    assert got["skipped"] == [0, 0, 1, 0, 0, 0] and got["skipped_steps"] == 1
    assert math.isnan(got["grad_norm"][2])
    assert got["loss"][:2] == ref["loss"][:2]
    assert all(math.isfinite(x) for x in got["loss"][3:])


def test_nan_stops_with_a_report_naming_step_and_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMJP_FAULT", "nan_loss@3:1")
    with pytest.raises(RuntimeError) as e:
        train(2, DENSE, tmp_path)
    assert "NonFiniteError: step 3: non-finite loss on ranks [1]" in str(e.value)


def test_nan_gradient_on_one_rank_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMJP_FAULT", "nan_grad@2:0")
    with pytest.raises(RuntimeError) as e:
        train(2, [*DENSE, "fault.nonfinite=skip", "fault.max_skipped_steps=0"], tmp_path)
    assert "step 2: non-finite gradients on ranks [0]" in str(e.value)
    assert "fault.max_skipped_steps=0" in str(e.value)
