"""Bad configs fail fast: one line naming the field, exit status 2, no traceback, no output.

``llmjp-train`` is driven in-process (``main(argv)``) with the launcher variables of a
4-rank (or other size) torchrun job set in the environment; validation must happen before
any process group, model or output directory exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_llmjp.cli.train import main

REPO = Path(__file__).resolve().parents[2]
PREFIX = "llmjp-train: error: "
# Launcher variables that discover_ranks() would read besides torchrun's.
_OTHER_LAUNCHER_PREFIXES = ("OMPI_", "SLURM_", "PMIX_", "PMI_")
_OTHER_LAUNCHER_NAMES = ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID")


def _clean_launcher_env(monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    for name in list(os.environ):
        if name.startswith(_OTHER_LAUNCHER_PREFIXES) or name in _OTHER_LAUNCHER_NAMES:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


# (id, world size, --set overrides, fragments the message must contain)
CASES = [
    (
        "world_not_divisible_by_tp_pp_cp",
        4,
        ["parallel.tp=3"],
        ["world size 4", "parallel.tp*pp*cp", "3*1*1 = 3"],
    ),
    (
        "heads_not_divisible_by_tp",
        8,
        ["parallel.tp=8"],  # tiny-dense: 4 heads; 8 ranks = tp8 x dp1, so only heads fail
        ["model.num_attention_heads=4", "parallel.tp=8"],
    ),
    (
        "query_groups_not_divisible_by_tp",
        4,
        # 12 heads (ok for tp4), 6 query groups (neither a multiple nor a divisor of 4)
        ["model.num_attention_heads=12", "model.num_query_groups=6", "parallel.tp=4"],
        ["model.num_query_groups=6", "parallel.tp=4"],
    ),
    (
        "tp_not_a_multiple_of_fewer_query_groups",
        4,
        # 12 heads, 3 query groups: megatron-core would replicate KV only for tp % 3 == 0
        ["model.num_attention_heads=12", "model.num_query_groups=3", "parallel.tp=4"],
        ["parallel.tp=4", "model.num_query_groups=3", "multiple"],
    ),
    (
        "layers_not_divisible_by_pp",
        4,
        ["model.num_layers=3", "parallel.pp=2"],
        ["model.num_layers=3", "parallel.pp=2"],
    ),
    (
        "layers_not_divisible_by_pp_vpp",
        4,
        ["model.num_layers=6", "parallel.pp=2", "parallel.vpp=2"],
        ["model.num_layers=6", "parallel.pp*vpp", "2*2 = 4"],
    ),
    (
        "experts_not_divisible_by_ep",
        6,
        ["model.name=llm-jp-4-tiny-moe", "parallel.ep=3"],  # 8 experts
        ["model.num_experts=8", "parallel.ep=3"],
    ),
    (
        "global_batch_not_divisible_by_micro_batch_times_dp",
        4,
        ["train.micro_batch_size=2", "train.global_batch_size=12"],  # dp=4: 12 % 8
        ["train.global_batch_size=12", "micro_batch_size*dp", "2*4 = 8"],
    ),
    (
        "unknown_key_in_set",
        4,
        ["train.iterz=5"],
        ["--set", "unknown config key 'train.iterz'", "iters"],
    ),
    (
        "checkpoint_interval_without_dir",
        1,
        ["checkpoint.interval=100"],
        ["checkpoint.interval", "checkpoint.dir is not"],
    ),
    (
        "uncatchable_exit_signal",
        1,
        ["fault.exit_signals=[SIGTERM,SIGKILL]"],
        ["fault.exit_signals", "'SIGKILL'", "not a catchable signal"],
    ),
    (
        "loss_spike_factor_below_one",
        1,
        ["fault.loss_spike_factor=0.5"],
        ["fault.loss_spike_factor", "> 1", "0.5"],
    ),
    (
        "checkpoint_load_does_not_exist",
        2,
        ["checkpoint.load=/nonexistent/ckpt"],
        ["checkpoint.load: /nonexistent/ckpt does not exist"],
    ),
    (
        "unknown_model_name",
        4,
        ["model.name=llm-jp-4-nope"],
        ["model.name", "'llm-jp-4-nope'", "llm-jp-4-tiny-dense"],
    ),
    (
        "null_tokenizer_without_mixture",
        1,
        ["data.null_tokenizer_vocab_size=1000", "model.vocab_size=1001"],
        ["data.null_tokenizer_vocab_size needs data.mixture"],
    ),
]


def _run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_clean_line(rc: int, out: str, err: str, fragments: list[str]) -> str:
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(PREFIX), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


@pytest.mark.parametrize(
    ("world", "overrides", "fragments"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_config_is_one_line_exit_2(monkeypatch, capsys, tmp_path, world, overrides, fragments):
    _clean_launcher_env(monkeypatch, world)
    out_dir = tmp_path / "out"
    argv = ["--output-dir", str(out_dir), "--set", "data.synthetic=true"]
    for item in overrides:
        argv += ["--set", item]
    rc, out, err = _run_main(argv, capsys)
    _assert_one_clean_line(rc, out, err, fragments)
    # Validation happens before any work: nothing was written.
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_heads_message_names_heads_not_world_size(monkeypatch, capsys, tmp_path):
    """The heads case above must hit the heads check itself, not an earlier world-size one."""
    _clean_launcher_env(monkeypatch, 8)
    rc, out, err = _run_main(
        ["--output-dir", str(tmp_path / "out"), "--set", "data.synthetic=true"]
        + ["--set", "parallel.tp=8"],
        capsys,
    )
    line = _assert_one_clean_line(rc, out, err, ["num_attention_heads"])
    assert "world size" not in line
    assert "num_query_groups" not in line


def test_yaml_type_error_names_file_line_and_field(monkeypatch, capsys, tmp_path):
    _clean_launcher_env(monkeypatch, 4)
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("train:\n  iters: abc\n")
    out_dir = tmp_path / "out"
    rc, out, err = _run_main(
        ["--config", str(cfg_file), "--output-dir", str(out_dir), "--set", "data.synthetic=true"],
        capsys,
    )
    _assert_one_clean_line(rc, out, err, [f"{cfg_file}:2", "train.iters", "expected int", "'abc'"])
    assert not out_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="context parallelism is allowed where CUDA is present"
)
def test_context_parallel_on_cpu_is_refused(monkeypatch, capsys, tmp_path):
    _clean_launcher_env(monkeypatch, 4)
    out_dir = tmp_path / "out"
    rc, out, err = _run_main(
        ["--output-dir", str(out_dir), "--set", "data.synthetic=true", "--set", "parallel.cp=2"],
        capsys,
    )
    _assert_one_clean_line(rc, out, err, ["parallel.cp=2", "Transformer Engine", "CUDA"])
    assert not out_dir.exists()


def test_error_is_printed_on_rank_0_only(monkeypatch, capsys, tmp_path):
    _clean_launcher_env(monkeypatch, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rc = main(
        ["--output-dir", str(tmp_path / "out"), "--set", "data.synthetic=true"]
        + ["--set", "parallel.tp=3"]
    )
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err == ""


def test_subprocess_bad_layout_exits_2_with_one_line():
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(_OTHER_LAUNCHER_PREFIXES) or k in _OTHER_LAUNCHER_NAMES)
    }
    env.update(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0")
    cmd = [
        sys.executable,
        "-m",
        "megatron_llmjp.cli.train",
        "--set",
        "data.synthetic=true",
        "--set",
        "parallel.tp=3",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].strip()
    assert lines[0].startswith(PREFIX)
    assert "parallel.tp*pp*cp" in lines[0]
    assert proc.stdout == ""
