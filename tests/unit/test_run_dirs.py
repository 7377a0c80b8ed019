"""Checkpoints belong to the run directory: a relative ``checkpoint.dir`` lies in
``output_dir``, so ``--output-dir`` moves them, in every shipped config and through the
launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_llmjp.config.loader import build_config, checkpoint_dir, load_yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    p
    for p in (REPO / "configs").rglob("*.yaml")
    if "checkpoint" in load_yaml(p)[0] and "output_dir" in load_yaml(p)[0]
)


def test_relative_dir_is_in_the_run_directory_and_absolute_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint_dir("runs/a", "checkpoints") == str(tmp_path / "runs/a/checkpoints")
    assert checkpoint_dir("runs/a", "/data/ckpt") == "/data/ckpt"
    assert checkpoint_dir("runs/a", None) is None
    cfg = build_config(
        overrides=["model.name=llm-jp-4-tiny-dense", "data.synthetic=true", "checkpoint.dir=ck"],
        output_dir="runs/b",
    )
    assert cfg.checkpoint.dir == str(tmp_path / "runs/b/ck")
    # Idempotent: the resolved config (as saved in config.yaml) resumes the same checkpoints.
    again = build_config(overrides=[f"checkpoint.dir={cfg.checkpoint.dir}", "data.synthetic=true"])
    assert again.checkpoint.dir == cfg.checkpoint.dir


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_keeps_checkpoints_in_its_output_dir(path, tmp_path):
    data, _ = load_yaml(path)
    raw = data["checkpoint"].get("dir")
    assert raw is not None and not Path(raw).is_absolute(), f"{path}: checkpoint.dir={raw}"
    assert not raw.startswith(data["output_dir"]), f"{path}: output_dir repeated in {raw}"
    for out in (tmp_path / "mine", Path(data["output_dir"]).resolve()):
        assert checkpoint_dir(str(out), raw).startswith(str(out) + "/")


def test_quickstart_output_dir_moves_the_checkpoints(monkeypatch):
    """The README's ``bash launch/local/quickstart.sh --output-dir runs/mine``: nothing of that
    run points into runs/quickstart."""
    monkeypatch.chdir(REPO)
    cfg = build_config(REPO / "configs/quickstart.yaml", [], "runs/mine", uses=("checkpoint",))
    assert cfg.checkpoint.dir == str(REPO / "runs/mine/checkpoints")
    default = build_config(REPO / "configs/quickstart.yaml", [], None, uses=("checkpoint",))
    assert default.checkpoint.dir == str(REPO / "runs/quickstart/checkpoints")
    script = (REPO / "launch/local/quickstart.sh").read_text()
    assert "runs/quickstart/checkpoints" not in script


def test_launcher_resolves_checkpoints_in_the_job_workdir(tmp_path, monkeypatch):
    from megatron_llmjp.launch.plan import LaunchRequest, make_plan

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = make_plan(
        LaunchRequest(
            scheduler="local",
            nodes=1,
            gpus_per_node=1,
            output_dir="runs/mine",
            overrides=(
                "model.name=llm-jp-4-tiny-dense",
                "data.synthetic=true",
                "checkpoint.dir=checkpoints",
            ),
            workdir=str(work),
        )
    )
    assert str(work / "runs/mine/checkpoints") in plan.mkdirs
    assert not any(str(elsewhere) in d for d in plan.mkdirs)
