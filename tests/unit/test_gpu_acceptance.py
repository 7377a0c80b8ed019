"""tools/gpu/acceptance.py on CPU: arguments, the plan it derives, the report and its judges.

The GPU runs themselves need an H100/H200; everything that decides what they run and how their
results are judged is checked here against hand-derived figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.planner.hardware import GiB

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location(
        "gpu_acceptance", REPO / "tools/gpu/acceptance.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = mod
    spec.loader.exec_module(mod)
    return mod


acc = _load()
H200 = acc.Machine(device_name="NVIDIA H200", capability=(9, 0), te_version="2.10.0")


# ------------------------------------------------------------------ arguments


def test_default_arguments_run_every_part_within_eight_minutes():
    args = acc.parse_args([])
    assert args.parts == ["dense_8b", "moe_32b_a3b", "checkpoint", "gpu_tests"]
    assert args.budget_s == 480
    assert sum(acc.PART_BUDGETS_S.values()) == 480  # probe included
    assert not args.dry_run and args.worker is None


def test_parts_subset_keeps_the_running_order():
    args = acc.parse_args(["--parts", "gpu_tests, dense_8b"])
    assert args.parts == ["dense_8b", "gpu_tests"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--parts", "dense_8b,bogus"], "bogus"),
        (["--parts", ","], "empty"),
        (["--budget-s", "10"], "--budget-s"),
    ],
)
def test_bad_arguments_exit_2_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        acc.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_deadlines_pass_unused_time_forward_and_borrow_a_quarter():
    budgets = acc.budgets_for(480)
    ends = acc.deadlines(1000.0, ["dense_8b", "checkpoint"], budgets)
    # probe 30, dense 120, checkpoint 60: all done by 1210; dense may borrow 15 of the 60 s.
    assert ends == {"probe": 1030.0, "dense_8b": 1165.0, "checkpoint": 1210.0}
    full = acc.deadlines(0.0, list(acc.PARTS), budgets)
    assert full["gpu_tests"] == 480.0
    assert full["dense_8b"] == 480.0 - 0.75 * (130 + 60 + 140)
    assert acc.budgets_for(240)["gpu_tests"] == 70.0


def test_run_timeouts_keep_time_for_the_runs_after_them():
    # 90 s left, three runs: 90 - 2 x 20 = 50 s for this one.
    assert acc.share(now=1050.0, part_deadline=1140.0, runs_left=3) == 50.0
    # 45 s left, three runs: never less than an equal share.
    assert acc.share(now=1095.0, part_deadline=1140.0, runs_left=3) == 15.0
    assert acc.share(now=1100.0, part_deadline=1140.0, runs_left=1) == 40.0
    assert acc.share(now=1200.0, part_deadline=1140.0, runs_left=1) == 0.0


# ------------------------------------------------------------------ the plan


def test_dense_shape_is_llm_jp_4_8b_with_four_layers():
    cfg = build_config(overrides=acc.shape_overrides("dense_8b"))
    m = cfg.model
    # LLM-jp-4 8B model card: hidden 4096, FFN 14336, 32 heads, 8 KV heads of 128.
    assert (m.hidden_size, m.ffn_hidden_size) == (4096, 14336)
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels) == (32, 8, 128)
    assert m.num_layers == 4 and not m.is_moe
    assert cfg.train.seq_length == 4096 and cfg.precision.dtype == "bf16"
    assert cfg.precision.fp8 is None and cfg.data.synthetic


def test_moe_shape_is_llm_jp_4_32b_a3b_with_grouped_gemm():
    cfg = build_config(overrides=acc.shape_overrides("moe_32b_a3b"))
    m = cfg.model
    # LLM-jp-4 32B-A3B model card: hidden 2560, 128 experts of 960, top-8, 40 heads, 4 KV.
    assert (m.hidden_size, m.num_experts, m.moe_ffn_hidden_size) == (2560, 128, 960)
    assert m.moe_router_topk == 8 and m.is_moe and m.num_layers == 2
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels) == (40, 4, 128)
    assert cfg.parallel.ep == 1 and cfg.performance.moe_grouped_gemm is True
    assert cfg.train.seq_length == 4096


def test_fp8_recipes_follow_the_gpu_and_transformer_engine():
    runs = {r.name: r for r in acc.plan_runs("dense_8b", H200)}
    assert list(runs) == ["bf16", "delayed", "tensorwise", "blockwise", "mxfp8"]
    assert [n for n, r in runs.items() if r.skip_reason is None] == [
        "bf16",
        "delayed",
        "tensorwise",
        "blockwise",
    ]
    assert "Blackwell" in runs["mxfp8"].skip_reason
    assert "precision.fp8=blockwise" in runs["blockwise"].overrides
    blackwell = acc.Machine(capability=(10, 0), te_version="2.10.0")
    assert all(r.skip_reason is None for r in acc.plan_runs("moe_32b_a3b", blackwell))
    old_te = acc.Machine(capability=(9, 0), te_version="2.1.0")
    skipped = {r.name for r in acc.plan_runs("dense_8b", old_te) if r.skip_reason}
    assert skipped == {"tensorwise", "blockwise", "mxfp8"}  # tensorwise needs TE >= 2.2


def test_step_flops_of_the_dense_shape_by_hand():
    # Per layer: QKV 4096 x (4096 + 2 x 1024), proj 4096 x 4096, SwiGLU 3 x 4096 x 14336;
    # output layer 4096 x 196608; causal attention 2 x 2 x (4096 / 2) x 4096 per layer.
    layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336
    forward = 2 * (4 * layer + 4096 * 196608) + 4 * (2 * 2 * 2048 * 4096)
    step = 3 * forward * 8 * 4096
    assert acc.step_tflop(acc.shape_overrides("dense_8b")) == pytest.approx(step / 1e12)
    assert step / 1e12 == pytest.approx(343.0, abs=0.1)


def test_planner_estimate_of_the_dense_shape():
    est = acc.planner_estimate(acc.shape_overrides("dense_8b"), "NVIDIA H200")
    layer = 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096  # + two RMSNorm weights
    params = 4 * layer + 2 * 196608 * 4096 + 4096  # untied embedding/output, final norm
    terms = est["terms_bytes"]
    # BF16 weights, FP32 gradient buffer, FP32 master + two Adam moments (one rank: dp=1).
    assert terms["weights"] == pytest.approx(2 * params, rel=1e-3)
    assert terms["gradients"] == pytest.approx(4 * params, rel=1e-3)
    assert terms["optimizer"] == pytest.approx(12 * params, rel=1e-3)
    assert terms["overhead"] == 3 * GiB
    assert est["total_bytes"] == sum(terms.values())
    assert est["without_overhead_bytes"] == est["total_bytes"] - 3 * GiB
    # The logits of one 4096-token microbatch in FP32 alone are 3 GiB: activations are large.
    assert terms["activations"] > 4096 * 196608 * 4
    assert est["fits"]  # 40-50 GiB on a 141 GB H200 (and an 80 GB H100)
    assert est["total_bytes"] < 80 * 10**9


def test_planner_row_of_device_names():
    assert acc.planner_row("NVIDIA H200") == "h200"
    assert acc.planner_row("NVIDIA H100 80GB HBM3") == "h100"
    assert acc.planner_row("NVIDIA GeForce RTX 4090") == "h200"


def test_dry_run_prints_the_plan_without_cuda(capsys):
    import torch

    assert acc.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "mxfp8       skipped" in text and "sm_90" in text
    assert "343.0 TFLOP/step" in text  # the hand-derived dense step above
    for part in acc.PARTS:
        assert part in text
    assert "model.name=llm-jp-4-32b-a3b" in text
    assert not torch.cuda.is_initialized()


# ------------------------------------------------------------------ judging results


def _estimate(total_gib: float) -> dict:
    return {
        "total_bytes": int(total_gib * GiB),
        "without_overhead_bytes": int((total_gib - 3) * GiB),
    }


def test_judge_run():
    good = {"losses": [12.3, 12.1], "mfu": 0.4, "peak_allocated_bytes": 40 * GiB}
    ok, problems = acc.judge_run(dict(good), _estimate(51), bf16=True)
    assert ok and not problems
    f = dict(good)
    acc.judge_run(f, _estimate(43), bf16=True)
    assert f["memory_vs_estimate"] == pytest.approx(1.0)
    assert acc.judge_run({**good, "losses": [12.0, float("nan")]}, _estimate(51), True)[0] is False
    assert acc.judge_run({**good, "mfu": 1.3}, _estimate(51), True)[0] is False
    assert acc.judge_run({**good, "mfu": None}, _estimate(51), True)[0] is True
    # Above the planner's estimate: a failure for BF16, a reported figure for FP8.
    assert acc.judge_run(dict(good), _estimate(30), bf16=True)[0] is False
    fp8 = dict(good)
    assert acc.judge_run(fp8, _estimate(30), bf16=False)[0] is True
    assert fp8["memory_within_estimate"] is False


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_gpu_train" name="test_a" time="3.5"/>
<testcase classname="tests.gpu.test_gpu_train" name="test_b" time="1.0">
  <skipped type="pytest.skip" message="needs two GPUs">skip</skipped></testcase>
<testcase classname="tests.gpu.test_gpu_fp8" name="test_c[delayed]" time="9.25">
  <failure message="assert 3 &lt; 2">trace</failure></testcase>
</testsuite></testsuites>"""


def test_pytest_results_from_junit_and_from_a_killed_run(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(JUNIT)
    tests = acc.parse_junit(xml)
    assert [(t["name"].split("::")[1], t["outcome"], t["seconds"]) for t in tests] == [
        ("test_a", "passed", 3.5),
        ("test_b", "skipped", 1.0),
        ("test_c[delayed]", "failed", 9.25),
    ]
    assert tests[2]["message"] == "assert 3 < 2"
    assert acc.judge_tests(tests, rc=1) == "failed"
    assert acc.judge_tests(tests[:2], rc=0) == "passed"
    assert acc.judge_tests(tests[1:2], rc=0) == "failed"  # nothing ran: not a pass
    assert acc.judge_tests(tests[:2], rc=None) == "timeout"
    text = (
        "tests/gpu/test_gpu_train.py::test_a PASSED     [ 10%]\n"
        "noise\ntests/gpu/test_gpu_fp8.py::test_c[delayed] FAILED [ 20%]\n"
    )
    parsed = acc.parse_pytest_output(text)
    assert [(t["name"], t["outcome"]) for t in parsed] == [
        ("tests/gpu/test_gpu_train.py::test_a", "passed"),
        ("tests/gpu/test_gpu_fp8.py::test_c[delayed]", "failed"),
    ]


def test_child_timeout_kills_its_whole_process_group(tmp_path):
    marker = tmp_path / "alive"
    child = acc.Child.start(
        ["sh", "-c", f"(sleep 1; echo alive > {marker}) & sleep 30"],
        tmp_path / "log.txt",
        acc.child_env(),
    )
    rc, wall = child.wait(0.3)
    assert rc is None and wall < 10
    time.sleep(1.5)
    assert not marker.exists()  # the background child went with the group


# ------------------------------------------------------------------ the report


def _report(parts: dict, passed: bool) -> dict:
    return {
        "schema": acc.SCHEMA,
        "started": "2026-01-01T00:00:00+00:00",
        "wall_s": 1.0,
        "budget_s": 480.0,
        "machine": {},
        "parts": parts,
        "passed": passed,
    }


def test_report_schema_checks():
    run = {
        "name": "bf16",
        "status": "passed",
        "passed": True,
        "figures": {
            "tflops_per_gpu": 420.0,
            "mfu": 0.42,
            "peak_allocated_bytes": 40 * GiB,
            "step_time_s": 0.8,
        },
        "planner_estimate": _estimate(51),
    }
    part = {"status": "passed", "passed": True, "runs": [run]}
    acc.validate_report(_report({"dense_8b": part}, True))
    table = acc.format_table(_report({"dense_8b": part}, True))
    assert "420 TFLOP/s, MFU 42.0%, peak 40.0 GiB vs planner 48.0 GiB" in table
    assert table.splitlines()[-1].startswith("PASSED")
    with pytest.raises(ValueError, match="disagrees"):
        acc.validate_report(_report({"dense_8b": part}, False))
    with pytest.raises(ValueError, match="unknown part"):
        acc.validate_report(_report({"dense": part}, True))
    with pytest.raises(ValueError, match="tflops_per_gpu"):
        bad = {**run, "figures": {"mfu": 0.4}}
        acc.validate_report(_report({"dense_8b": {**part, "runs": [bad]}}, True))
    with pytest.raises(ValueError, match="schema"):
        acc.validate_report({**_report({}, False), "schema": "other/0"})


def test_without_cuda_every_part_is_an_error_in_a_complete_report(tmp_path):
    """The real command on this CPU machine: the probe finds no CUDA, each part says so, the
    report is written (atomically: no temporary file left) and the exit status is 1."""
    out = tmp_path / "report.json"
    work = tmp_path / "work"
    (work / "dense_8b" / "bf16").mkdir(parents=True)  # a previous run's (would be appended to)
    (work / "mine").mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu/acceptance.py"), "--output", str(out)]
        + ["--parts", "dense_8b,gpu_tests", "--workdir", str(work)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    acc.validate_report(report)
    assert report["machine"]["cuda_available"] is False
    assert set(report["parts"]) == {"dense_8b", "gpu_tests"}
    assert all(p["status"] == "error" for p in report["parts"].values())
    assert "no CUDA" in report["parts"]["dense_8b"]["detail"]
    assert report["passed"] is False
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "FAILED in" in proc.stdout and str(out) in proc.stdout
    assert not (work / "dense_8b").exists() and (work / "mine").is_dir()


# ------------------------------------------------------------------ setup.sh


def _setup(tmp_path, *args, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LLMJP_WHEELS", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        ["bash", str(REPO / "tools/gpu/setup.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_changes_nothing_where_te_and_megatron_core_import(tmp_path):
    """Stand-ins for an installed Transformer Engine and megatron-core (packages and their
    metadata, first on the path): setup.sh reports both and exits 0 without looking for wheels
    (there are none) and without writing anything."""
    site = tmp_path / "site"
    for package, dist, version in (
        ("transformer_engine/pytorch", "transformer_engine", "2.10.0"),
        ("megatron/core", "megatron_core", "0.16.1"),
    ):
        (site / package).mkdir(parents=True)
        (site / package.split("/")[0] / "__init__.py").write_text("")
        (site / package / "__init__.py").write_text("")
        meta = site / f"{dist}-{version}.dist-info"
        meta.mkdir()
        name = dist.replace("_core", "-core")
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = _setup(tmp_path, str(tmp_path / "no-wheels"), pythonpath=str(site))
    assert proc.returncode == 0, proc.stderr
    assert "megatron-core 0.16.1, transformer_engine 2.10.0: ready" in proc.stdout
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_setup_without_wheels_or_cuda_exits_2(tmp_path):
    proc = _setup(tmp_path, str(tmp_path / "missing"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    (tmp_path / "wheels").mkdir()
    proc = _setup(tmp_path, str(tmp_path / "wheels"))
    assert proc.returncode == 2 and "no CUDA build" in proc.stderr  # this machine's CPU torch


@pytest.mark.slow
@pytest.mark.distributed
def test_train_worker_reports_the_figures_of_a_run(tmp_path):
    """The performance worker through the trainer API, on CPU with a tiny model: every step is
    reported, the throughput follows from the median step time of the steps after the first
    two and the model FLOPs, and a CPU has no MFU and no CUDA memory figures."""
    overrides = [
        "model.name=llm-jp-4-tiny-dense",
        "data.synthetic=true",
        "train.iters=4",
        "train.seq_length=64",
        "train.global_batch_size=2",
        "logging.tensorboard=false",
        "logging.gpu_telemetry=false",
    ]
    spec = tmp_path / "spec.json"
    result = tmp_path / "result.json"
    spec.write_text(
        json.dumps(
            {"overrides": overrides, "output_dir": str(tmp_path / "run"), "result": str(result)}
        )
    )
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/gpu/acceptance.py"), "--worker", "train"]
        + ["--spec", str(spec)],
        env=acc.child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    f = json.loads(result.read_text())
    records = acc.read_metrics(tmp_path / "run")
    assert f["steps"] == 4 and len(f["losses"]) == 4 and f["measured_steps"] == 2
    assert f["losses"] == [r["loss"] for r in records]
    times = sorted(r["step_time"] for r in records[2:])
    assert f["step_time_s"] == pytest.approx(sum(times) / 2)  # the median of two
    step = acc.step_tflop(overrides) * 1e12
    assert f["tflops_per_gpu"] == pytest.approx(step / f["step_time_s"] / 1e12)
    assert f["tokens_per_s"] == pytest.approx(2 * 64 / f["step_time_s"])
    assert "mfu" not in f and f["peak_tflops"] is None
    assert f["peak_allocated_bytes"] is None
