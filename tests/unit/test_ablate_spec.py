"""The ablation file (``megatron_llmjp/ablate/spec.py``): parsing, every kind of bad input
with a message naming the file and key, the run configs built with the trainer's own loader,
and the ``llmjp-ablate`` command line (errors, dry runs, pending jobs) without running any."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_llmjp.ablate.spec import load_spec, run_plans, select
from megatron_llmjp.cli import ablate as cli
from megatron_llmjp.config.loader import ConfigError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
overrides:
  - data.synthetic=true
  - train.iters=4
  - train.seq_length=64
  - train.global_batch_size=4
baseline: fp32
variants:
  fp32: []
  bf16: [precision.dtype=bf16]
divergence_threshold: 0.1
smoothing: 2
"""


def write(tmp_path: Path, text: str, name: str = "abl.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_file_and_defaults(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.baseline == "fp32"
    assert list(spec.variants) == ["fp32", "bf16"]
    assert spec.variants["bf16"] == ("precision.dtype=bf16",)
    assert spec.output_dir == "runs/ablations/abl"
    assert (spec.nproc, spec.divergence_mode, spec.variant_checkpoints) == (1, "absolute", True)
    assert spec.divergence_threshold == 0.1 and spec.smoothing == 2


def test_run_plans_pair_the_runs(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    root = tmp_path / "out"
    plans = run_plans(spec, root, ("optim.lr=1e-3",), world=1)
    init, fp32, bf16 = plans["init"], plans["fp32"], plans["bf16"]
    assert init.cfg.train.iters == 0
    assert init.cfg.checkpoint.dir == str(root / "init" / "checkpoints")
    for p in (fp32, bf16):
        assert p.cfg.checkpoint.load == str(root / "init" / "checkpoints")
        assert p.cfg.checkpoint.load_optimizer is False
        assert p.cfg.checkpoint.dir == str(p.output_dir / "checkpoints")
        assert p.cfg.optim.lr == 1e-3  # the command line's --set reaches every run
        assert p.cfg.train.seed == init.cfg.train.seed and p.cfg.data == init.cfg.data
    assert bf16.cfg.precision.dtype == "bf16" and fp32.cfg.precision.dtype == "fp32"
    assert bf16.output_dir == root / "variants" / "bf16"


def test_without_variant_checkpoints(tmp_path):
    spec = load_spec(write(tmp_path, GOOD + "variant_checkpoints: false\n"))
    plans = run_plans(spec, tmp_path / "out")
    assert plans["bf16"].cfg.checkpoint.dir is None


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "colour: red\n", r"abl.yaml:12: unknown ablation key 'colour'"),
        (GOOD.replace("baseline: fp32", "baseline: fp16"), r"abl.yaml:6: baseline: 'fp16' is not"),
        (GOOD.replace("  bf16: [precision.dtype=bf16]\n", ""), "at least one other variant"),
        (GOOD.replace("bf16: [", "bf 16: ["), "variant name 'bf 16'"),
        (GOOD.replace("[precision.dtype=bf16]", "precision.dtype=bf16"), "expected a list"),
        (GOOD.replace("[precision.dtype=bf16]", "[precision.dtype]"), "is not 'section.key=value'"),
        (
            GOOD.replace("[precision.dtype=bf16]", "[model.num_layers=4]"),
            r"abl.yaml:9: variants.bf16: model.num_layers must be the same for every variant",
        ),
        (GOOD.replace("[precision.dtype=bf16]", "[train.seed=7]"), "train.seed must be the same"),
        (GOOD.replace("[precision.dtype=bf16]", "[data.seed=7]"), "data.seed must be the same"),
        (
            GOOD.replace("  - train.iters=4", "  - checkpoint.dir=/x"),
            r"abl.yaml:1: overrides: checkpoint.dir is set by llmjp-ablate",
        ),
        (GOOD + "divergence_threshold: 0\n", "divergence_threshold: must be > 0"),
        (GOOD + "divergence_mode: percent\n", "expected one of absolute, relative"),
        (GOOD + "smoothing: 0\n", "smoothing: expected an integer >= 1"),
        (GOOD + "nproc: two\n", "nproc: expected an integer >= 1"),
        (GOOD + "variant_checkpoints: maybe\n", "expected true or false"),
        ("baseline: a\nvariants: [a, b]\n", "variants: expected a mapping"),
        ("variants: {a: [}\n", "invalid YAML"),
    ],
)
def test_bad_ablation_files(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_spec(write(tmp_path, text))


@pytest.mark.parametrize(
    "variant, expected",
    [
        # The real config loader checks every variant before anything runs.
        ("precision.fp9=delayed", r"abl.yaml:9: variant 'bf16': .*unknown config key 'precision"),
        ("precision.dtype=fp16", r"variant 'bf16': .*precision.dtype: expected 'fp32' or 'bf16'"),
        ("parallel.tp=3", r"variant 'bf16': world size 2 is not divisible by parallel.tp"),
    ],
)
def test_variant_configs_are_validated(tmp_path, variant, expected):
    spec = load_spec(write(tmp_path, GOOD.replace("precision.dtype=bf16", variant)))
    with pytest.raises(ConfigError, match=expected):
        run_plans(spec, tmp_path / "out", world=2)


def test_layout_checked_against_world(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("[]", "[parallel.tp=2]")))
    run_plans(spec, tmp_path / "out", world=2)
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch_size"):
        run_plans(spec, tmp_path / "out", world=3)


def test_base_config_errors_name_the_shared_run(tmp_path):
    spec = load_spec(write(tmp_path, GOOD.replace("  - train.iters=4", "  - train.iters=-1")))
    with pytest.raises(ConfigError, match="the shared initial run|train.iters"):
        run_plans(spec, tmp_path / "out")
    missing = load_spec(write(tmp_path, "config: nowhere.yaml\n" + GOOD))
    with pytest.raises(ConfigError, match="config file not found"):
        run_plans(missing, tmp_path / "out")


def test_select_variants(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert select(spec, None) == ["fp32", "bf16"]
    assert select(spec, ["bf16"]) == ["bf16"]
    with pytest.raises(ConfigError, match="--variants: unknown variant 'fp8'"):
        select(spec, ["fp8"])


@pytest.mark.parametrize(
    "name, world",
    [("tiny_cpu_bf16_vs_fp8.yaml", 2), ("llm-jp-4-8b_fp8.yaml", 32)],
)
def test_example_files_validate(name, world, monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the checkout
    spec = load_spec(REPO / "configs" / "ablations" / name)
    plans = run_plans(spec, REPO / "runs" / "never-written", world=world)
    assert spec.baseline in plans and len(plans) == len(spec.variants) + 1
    assert any(p.cfg.precision.fp8 for p in plans.values())


# -- the command line (nothing is run) -----------------------------------------------------


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    bad = write(tmp_path, GOOD.replace("baseline: fp32", "baseline: nope"))
    assert cli.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmjp-ablate: error: ") and err.count("\n") == 1
    good = write(tmp_path, GOOD, "good.yaml")
    assert cli.main([str(good), "--container", "x.sif"]) == 2
    assert "--container applies to --launcher pbs or slurm" in capsys.readouterr().err
    assert cli.main([str(good), "--variants", "fp8"]) == 2
    assert cli.main([str(good), "--set", "checkpoint.load=/x"]) == 2
    assert "set by llmjp-ablate" in capsys.readouterr().err


def test_cli_local_dry_run_prints_torchrun_lines(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    out = tmp_path / "out"
    assert cli.main([str(good), "--output-dir", str(out), "--dry-run", "--nproc", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("torch.distributed.run") == 3  # init + 2 variants
    assert f"checkpoint.load={out / 'init' / 'checkpoints'}" in text
    assert not out.exists()


@pytest.mark.parametrize("scheduler, depend", [("pbs", "-W 'depend="), ("slurm", "'--dependency=")])
def test_cli_cluster_dry_run(tmp_path, capsys, scheduler, depend):
    good = write(tmp_path, GOOD)
    sif = tmp_path / "llmjp.sif"
    sif.write_text("")
    out = tmp_path / "out"
    flags = ["--project", "gX"] if scheduler == "pbs" else ["--account", "a", "--partition", "p"]
    argv = [str(good), "--launcher", scheduler, "--output-dir", str(out), "--dry-run"]
    argv += ["--nodes", "1", "--gpus-per-node", "1", "--container", str(sif)]
    argv += ["--walltime", "01:00:00", *flags]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("# submit: ") == 3
    assert text.count("afterok:<init job id>") == 2
    assert text.count(depend) == 2
    assert f"checkpoint.load={out / 'init' / 'checkpoints'}" in text
    assert "train.iters=0" in text
    assert not out.exists()


def test_cli_pending_jobs_are_not_resubmitted(tmp_path, capsys, monkeypatch):
    """A submitted variant without finished output is pending; one whose metrics reach
    train.iters counts as done; the report lists both."""
    good = write(tmp_path, GOOD)
    out = tmp_path / "out"
    plans = run_plans(load_spec(good), out)
    for name in ("init", "fp32", "bf16"):
        d = plans[name].output_dir
        d.mkdir(parents=True)
        status = {
            "state": "submitted",
            "job_id": f"{name}.1",
            "overrides": list(plans[name].overrides),
        }
        (d / "status.json").write_text(json.dumps(status))
    ckpt = out / "init" / "checkpoints"
    (ckpt / "iter_0000000").mkdir(parents=True)
    (ckpt / "latest").write_text("0\n")
    rows = [
        {"step": s, "loss": 5.0 - s / 10, "grad_norm": 1.0, "tokens_per_sec": 100.0}
        for s in range(1, 5)
    ]
    (out / "variants" / "fp32" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )

    def no_submit(*a, **k):
        raise AssertionError("nothing may be submitted")

    monkeypatch.setattr("megatron_llmjp.ablate.runner.submit", no_submit)
    sif = tmp_path / "llmjp.sif"
    sif.write_text("")
    argv = [str(good), "--launcher", "pbs", "--output-dir", str(out), "--container", str(sif)]
    argv += ["--project", "gX", "--walltime", "01:00:00", "--gpus-per-node", "1"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "fp32: done, skipped" in text and "bf16: job bf16.1 pending" in text
    assert json.loads((out / "variants" / "fp32" / "status.json").read_text())["state"] == "done"
    assert cli.main([str(good), "--output-dir", str(out), "--report-only"]) == 1  # one pending
    report = (out / "report" / "report.md").read_text()
    assert "| bf16 | pending | 0 |" in report
    assert "| fp32 (baseline) | done | 4 |" in report


def test_cli_changed_overrides_are_refused(tmp_path, capsys):
    good = write(tmp_path, GOOD)
    out = tmp_path / "out"
    d = out / "variants" / "bf16"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"state": "done", "overrides": ["x=1"]}))
    assert cli.main([str(good), "--output-dir", str(out), "--report-only"]) == 2
    assert "was run with other overrides" in capsys.readouterr().err
