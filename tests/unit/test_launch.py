"""``llmjp-launch``: job scripts for PBS (ABCI 3.0) and SLURM through ``--dry-run``, bad input
refused before anything is written, the job script's own shell helpers, and the rendezvous
rules the trainer applies when a launcher leaves MASTER_ADDR unset."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llmjp.cli.launch import main
from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.launch.jobscript import (
    TEMPLATE_FILES,
    job_script,
    master_port,
    parse_nodefile,
    script_path,
    template_root,
)
from megatron_llmjp.launch.plan import (
    PACKAGE_ROOT,
    LaunchError,
    LaunchRequest,
    format_walltime,
    make_plan,
    parse_walltime,
)
from megatron_llmjp.parallel.dist import RankInfo, discover_ranks, set_rendezvous

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--set",
    "model.name=llm-jp-4-tiny-dense",
    "--set",
    "data.synthetic=true",
    "--set",
    "parallel.tp=2",
    "--set",
    "train.global_batch_size=48",
]
# $PBS_NODEFILE of a 3-node ABCI 3.0 job: one line per MPI slot, so hosts repeat.
PBS_NODEFILE = (
    "hnode017.abci.local\nhnode017.abci.local\nhnode003.abci.local\nhnode121.abci.local\n"
)
SLURM_HOSTS = "gpu-a07\ngpu-a08\ngpu-b01\n"


@pytest.fixture
def sif(tmp_path: Path) -> Path:
    image = tmp_path / "images" / "llmjp.sif"
    image.parent.mkdir()
    image.write_bytes(b"SIF stand-in: never executed by a dry run")
    return image


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _pbs_args(tmp_path: Path, sif: Path, nodes: int = 3) -> list[str]:
    return [
        "--scheduler",
        "pbs",
        "--nodes",
        str(nodes),
        "--container",
        str(sif),
        "--output-dir",
        str(tmp_path / "run"),
        "--project",
        "gcb50123",
        "--walltime",
        "02:00:00",
        *TINY,
    ]


def _resolved(out: str) -> str:
    """The part of the dry-run output that the job script printed for the allocation."""
    return out.split("# What the script runs", 1)[1]


def _command(out: str) -> str:
    lines = [ln for ln in _resolved(out).splitlines() if ln.startswith(("mpirun ", "srun "))]
    assert len(lines) == 1, out
    return lines[0]


def test_pbs_dry_run_three_nodes(tmp_path, sif, capsys):
    nodefile = tmp_path / "nodes.txt"
    nodefile.write_text(PBS_NODEFILE)
    code, out, err = _run(
        capsys, [*_pbs_args(tmp_path, sif), "--dry-run", "--nodefile", str(nodefile)]
    )
    assert code == 0, err
    for directive in (
        "#PBS -P gcb50123",
        "#PBS -q rt_HF",
        "#PBS -l select=3\n",
        "#PBS -l walltime=02:00:00",
        "#PBS -v RTYPE=rt_HF,USE_SSH=1",
    ):
        assert directive in out
    log = re.search(r"^#PBS -o (\S+)$", out, re.M)
    assert log and Path(log[1]).parent == tmp_path / "run" / "launch"
    assert log[1].endswith(".pbs.log")
    resolved = _resolved(out)
    # The first host of the node file, not the host running the dry run.
    assert "MASTER_ADDR=hnode017.abci.local" in resolved
    assert f"MASTER_PORT={master_port('1234567.pbs1')}" in resolved
    assert "24 ranks on 3 hosts" in resolved
    hostfile = re.findall(r"^    (\S+) slots=(\d+)$", resolved, re.M)
    assert hostfile == [
        ("hnode017.abci.local", "8"),
        ("hnode003.abci.local", "8"),
        ("hnode121.abci.local", "8"),
    ]
    assert "+ load_modules hpcx/2.20" in resolved
    cmd = _command(out)
    assert cmd.startswith("mpirun -np 24 --npernode 8 --hostfile ")
    assert "-bind-to none -map-by slot" in cmd
    for var in ("MASTER_ADDR", "MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_IB_TIMEOUT"):
        assert f"-x {var}" in cmd
    binds = re.search(r"singularity exec --nv --bind (\S+) (\S+) python ", cmd)
    assert binds and binds[2] == str(sif)
    bound = binds[1].split(",")
    assert str(tmp_path / "run") in bound
    assert str(PACKAGE_ROOT) in bound or any(PACKAGE_ROOT.is_relative_to(b) for b in bound)
    assert cmd.endswith(
        f"python -m megatron_llmjp.cli.train --output-dir {tmp_path / 'run'} "
        "--set model.name=llm-jp-4-tiny-dense --set data.synthetic=true --set parallel.tp=2 "
        "--set train.global_batch_size=48"
    )
    for env in (
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        "export TORCH_NCCL_AVOID_RECORD_STREAMS=1",
        "export NCCL_IB_TIMEOUT=23",
        f"export PYTHONPATH={PACKAGE_ROOT}",
    ):
        assert env in out
    assert "qsub " + str(tmp_path / "run" / "launch") in out
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_slurm_dry_run_three_nodes(tmp_path, sif, capsys):
    nodefile = tmp_path / "hosts.txt"
    nodefile.write_text(SLURM_HOSTS)
    code, out, err = _run(
        capsys,
        [
            "--scheduler",
            "slurm",
            "--nodes",
            "3",
            "--gpus-per-node",
            "8",
            "--container",
            str(sif),
            "--output-dir",
            str(tmp_path / "run"),
            "--account",
            "llm-jp",
            "--partition",
            "h200",
            "--walltime",
            "36:00:00",
            "--dry-run",
            "--nodefile",
            str(nodefile),
            *TINY,
        ],
    )
    assert code == 0, err
    for directive in (
        "#SBATCH --nodes=3\n",
        "#SBATCH --ntasks-per-node=8\n",
        "#SBATCH --gpus-per-node=8\n",
        "#SBATCH --time=1-12:00:00\n",
        "#SBATCH --account=llm-jp\n",
        "#SBATCH --partition=h200\n",
    ):
        assert directive in out
    resolved = _resolved(out)
    assert "MASTER_ADDR=gpu-a07 " in resolved
    assert f"MASTER_PORT={master_port('1234567')}" in resolved
    cmd = _command(out)
    assert cmd.startswith("srun --nodes=3 --ntasks-per-node=8 --kill-on-bad-exit=1")
    binds = re.search(r"singularity exec --nv --bind (\S+) (\S+) python ", cmd)
    assert binds and binds[2] == str(sif)
    assert str(tmp_path / "run") in binds[1].split(",")
    assert cmd.endswith("--set train.global_batch_size=48")
    assert "sbatch " + str(tmp_path / "run" / "launch") in out
    assert not (tmp_path / "run").exists()


def test_dry_run_without_nodefile_uses_labelled_sample_hosts(tmp_path, sif, capsys):
    code, out, err = _run(capsys, [*_pbs_args(tmp_path, sif), "--dry-run"])
    assert code == 0, err
    assert "sample allocation (node001, node002, node003" in out
    assert "MASTER_ADDR=node001 " in _resolved(out)


def test_abci3_recipes_at_their_scale(tmp_path, sif, capsys):
    for recipe, nodes in (
        ("configs/abci3/llm-jp-4-8b_32node_bf16.yaml", 32),
        ("configs/abci3/llm-jp-4-332b-a31b_64node_bf16.yaml", 64),
    ):
        code, out, err = _run(
            capsys,
            [
                "--scheduler",
                "pbs",
                "--nodes",
                str(nodes),
                "--container",
                str(sif),
                "--config",
                str(REPO / recipe),
                "--output-dir",
                str(tmp_path / "run"),
                "--project",
                "gcb50123",
                "--walltime",
                "168:00:00",
                "--dry-run",
            ],
        )
        assert code == 0, err
        assert f"#PBS -l select={nodes}\n" in out
        assert "#PBS -l walltime=168:00:00" in out
        assert _command(out).startswith(f"mpirun -np {nodes * 8} --npernode 8 ")
        assert f"--config {REPO / recipe}" in _command(out)


# --- bad input: one line, exit 2, nothing written ------------------------------------------


def _bad(tmp_path: Path, sif: Path, **change) -> list[str]:
    args = {
        "--scheduler": "pbs",
        "--nodes": "3",
        "--gpus-per-node": "8",
        "--container": str(sif),
        "--output-dir": str(tmp_path / "run"),
        "--project": "gcb50123",
        "--walltime": "02:00:00",
    }
    args.update({k: v for k, v in change.items() if v is not None})
    for k, v in change.items():
        if v is None:
            args.pop(k)
    argv = [x for kv in args.items() for x in kv]
    return [*argv, *TINY]


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"--nodes": "0"}, "--nodes must be >= 1, got 0"),
        ({"--gpus-per-node": "0"}, "--gpus-per-node must be >= 1"),
        ({"--gpus-per-node": "16"}, "--gpus-per-node 16: an ABCI 3.0 rt_HF node has 8 GPUs"),
        ({"--gpus-per-node": "3"}, "--gpus-per-node 3 is not a multiple of parallel.tp=2"),
        ({"--nodes": "5"}, "--nodes 5 x --gpus-per-node 8 = 40 ranks do not fit the config"),
        ({"--container": "/nonexistent/llmjp.sif"}, "--container /nonexistent/llmjp.sif: no such"),
        ({"--container": None}, "--container is required with --scheduler pbs"),
        ({"--walltime": "2h"}, "--walltime '2h': expected HH:MM:SS"),
        ({"--walltime": "10:75:00"}, "--walltime '10:75:00': expected HH:MM:SS"),
        ({"--walltime": None}, "--walltime is required with --scheduler pbs"),
        ({"--project": None}, "--project is required with --scheduler pbs"),
        ({"--account": "x"}, "--account does not apply to --scheduler pbs"),
        ({"--project": "g1 -q other"}, "--project 'g1 -q other': expected letters"),
        ({"--scheduler": "local", "--project": None, "--walltime": None}, "--nodes must be 1"),
        ({"--scheduler": "slurm"}, "--project does not apply to --scheduler slurm"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, sif, capsys, change, expected):
    code, out, err = _run(capsys, _bad(tmp_path, sif, **change))
    assert code == 2
    assert err.startswith("llmjp-launch: error: ")
    assert err.count("\n") == 1, err
    assert expected in err, err
    assert not out
    assert not (tmp_path / "run").exists()


def test_layout_error_names_the_config_field(tmp_path, sif, capsys):
    """The 8B recipe (GBS 512, dp = ranks) on 3 nodes: 512 is not divisible by 24."""
    code, _, err = _run(
        capsys,
        [
            *_bad(tmp_path, sif)[:14],
            "--config",
            str(REPO / "configs/abci3/llm-jp-4-8b_32node_bf16.yaml"),
        ],
    )
    assert code == 2
    assert "24 ranks do not fit the config" in err
    assert "train.global_batch_size=512" in err


def test_bad_config_override_is_reported_as_such(tmp_path, sif, capsys):
    code, _, err = _run(capsys, [*_bad(tmp_path, sif), "--set", "train.itres=3"])
    assert code == 2
    assert "unknown config key 'train.itres'" in err


def test_missing_data_file_fails_at_submit(tmp_path, sif, capsys):
    args = _bad(tmp_path, sif)
    args[args.index("data.synthetic=true")] = "data.synthetic=false"
    args += ["--set", f"data.text_files=[{tmp_path / 'missing.txt'}]"]
    code, _, err = _run(capsys, args)
    assert code == 2
    assert "data.text_files" in err
    assert f"{tmp_path / 'missing.txt'} does not exist" in err


def test_nodefile_with_wrong_host_count(tmp_path, sif, capsys):
    nodefile = tmp_path / "nodes.txt"
    nodefile.write_text("hnode001\nhnode002\n")
    code, _, err = _run(
        capsys, [*_pbs_args(tmp_path, sif), "--dry-run", "--nodefile", str(nodefile)]
    )
    assert code == 2
    assert "lists 2 hosts, --nodes is 3" in err


@pytest.mark.parametrize("scheduler,tool", [("pbs", "qsub"), ("slurm", "sbatch")])
def test_missing_submit_tool_is_a_clear_error(tmp_path, sif, capsys, monkeypatch, scheduler, tool):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    args = _bad(tmp_path, sif, **{"--scheduler": scheduler})
    if scheduler == "slurm":
        args = _bad(tmp_path, sif, **{"--scheduler": "slurm", "--project": None})
    code, _, err = _run(capsys, args)
    assert code == 2
    assert f"{tool} not found on PATH" in err
    assert "--dry-run" in err
    assert not (tmp_path / "run").exists()


def test_submission_writes_the_script_and_calls_qsub(tmp_path, sif, capsys, monkeypatch):
    """A stand-in qsub on PATH records its arguments: the launcher writes the script, then
    submits exactly that file. (No PBS here: what PBS does with it is the dry run's part.)"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "qsub-args"
    (bindir / "qsub").write_text(f'#!/bin/sh\necho "$@" > {record}\necho 4242.pbs1\n')
    (bindir / "qsub").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = _run(capsys, _pbs_args(tmp_path, sif))
    assert code == 0, err
    submitted = Path(record.read_text().strip())
    assert submitted.parent == tmp_path / "run" / "launch"
    assert submitted.read_text().startswith("#!/bin/bash\n#PBS -N ")
    assert os.access(submitted, os.X_OK)
    assert "submitted 4242.pbs1 (24 ranks)" in out


# --- the job script itself ------------------------------------------------------------------


def _plan(tmp_path: Path, sif: Path, scheduler: str):
    extra = {
        "pbs": {"project": "gcb50123", "walltime": "01:00:00"},
        "slurm": {"walltime": "01:00:00"},
        "local": {},
    }[scheduler]
    return make_plan(
        LaunchRequest(
            scheduler=scheduler,
            nodes=1 if scheduler == "local" else 3,
            gpus_per_node=4 if scheduler == "local" else 8,
            container=None if scheduler == "local" else str(sif),
            output_dir=str(tmp_path / "run"),
            overrides=tuple(TINY[1::2]),
            **extra,
        )
    )


@pytest.mark.parametrize("scheduler", sorted(TEMPLATE_FILES))
def test_generated_scripts_are_complete_and_valid_bash(tmp_path, sif, scheduler):
    plan = _plan(tmp_path, sif, scheduler)
    path = script_path(plan)
    text = job_script(plan, path)
    assert "{{" not in text and "}}" not in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (template_root() / TEMPLATE_FILES[scheduler]).is_file()


@pytest.mark.parametrize("job_id", ["1234567.pbs1", "98765", "4242[3].pbs1", "0000042.x", "abc"])
def test_shell_port_matches_python(job_id):
    proc = subprocess.run(
        ["bash", "-c", f'source {REPO / "launch/job_helpers.sh"}; derive_port "$1"', "_", job_id],
        capture_output=True,
        text=True,
        check=True,
    )
    port = int(proc.stdout)
    assert port == master_port(job_id)
    assert 20000 <= port < 30000


def test_neighbouring_jobs_get_different_ports():
    ports = {master_port(f"{n}.pbs1") for n in range(700000, 700200)}
    assert len(ports) == 200


def test_nodefile_parsing():
    assert parse_nodefile(PBS_NODEFILE) == [
        "hnode017.abci.local",
        "hnode003.abci.local",
        "hnode121.abci.local",
    ]
    assert parse_nodefile("# comment\n\n a slots=8\nb\na\n") == ["a", "b"]


def test_walltime_formats():
    assert parse_walltime("168:00:00") == 168 * 3600
    assert format_walltime(168 * 3600, "pbs") == "168:00:00"
    assert format_walltime(36 * 3600 + 61, "slurm") == "1-12:01:01"
    assert format_walltime(3600, "slurm") == "01:00:00"


def test_launcher_does_not_import_torch():
    """It runs on login nodes where only PyYAML may be installed."""
    code = (
        "import sys, megatron_llmjp.cli.launch as l, megatron_llmjp.launch.jobscript; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_data_outside_the_workdir_is_bound(tmp_path, sif):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "a.txt").write_text("text\n")
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    plan = make_plan(
        LaunchRequest(
            scheduler="slurm",
            nodes=1,
            gpus_per_node=8,
            container=str(sif),
            walltime="01:00:00",
            output_dir=str(tmp_path / "run"),
            overrides=(
                "model.name=llm-jp-4-tiny-dense",
                f"data.tokenizer={tok}",
                f"data.text_files=[{data / 'a.txt'}]",
                f"checkpoint.dir={tmp_path / 'ckpt'}",
            ),
            workdir=str(REPO),
        )
    )
    assert {str(data), str(tok), str(tmp_path / "run"), str(tmp_path / "ckpt")} <= set(plan.binds)
    assert str(tmp_path / "ckpt") in plan.mkdirs


# --- rendezvous when the launcher leaves MASTER_ADDR unset -----------------------------------


def _no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed


def test_rendezvous_from_environment_is_kept():
    env = {"MASTER_ADDR": "hnode017", "MASTER_PORT": "24567"}
    assert set_rendezvous(RankInfo(3, 3, 16, "openmpi"), env) == ("hnode017", 24567, "environment")


def test_single_host_mpi_launch_without_mpi4py_uses_loopback(monkeypatch):
    _no_mpi4py(monkeypatch)
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    addr, port, origin = set_rendezvous(RankInfo(1, 1, 4, "openmpi"), env)
    assert (addr, port, origin) == ("127.0.0.1", 29500, "default")
    assert env["MASTER_ADDR"] == "127.0.0.1"


def test_multi_host_mpi_launch_without_mpi4py_is_refused(monkeypatch):
    _no_mpi4py(monkeypatch)
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set and mpi4py is not usable"):
        set_rendezvous(RankInfo(9, 1, 16, "openmpi"), env)
    assert "MASTER_ADDR" not in env


def test_pmi_and_pmix_variables():
    assert discover_ranks({"PMIX_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1"}) == RankInfo(
        5, 1, 8, "pmix"
    )
    assert discover_ranks({"PMI_RANK": "2", "PMI_SIZE": "4"}) == RankInfo(2, 2, 4, "pmi")


def test_rank0_address_is_local_and_bindable():
    """What rank 0 broadcasts: loopback when all ranks share its host, otherwise an address
    of this machine (never the name of another host)."""
    import socket

    from megatron_llmjp.parallel.dist import _address_reachable_from

    me = socket.gethostname()
    assert _address_reachable_from([me, me, me]) == "127.0.0.1"
    addr = _address_reachable_from([me, "localhost"])
    with socket.socket() as s:
        s.bind((addr, 0))  # fails unless the address belongs to this machine


# --- a mixture run: its file and datasets are bound and checked; text_files are not used ------


def _mixture_plan(tmp_path: Path, sif: Path, sources: dict[str, str]):
    mix = tmp_path / "mixtures" / "mix.yaml"
    mix.parent.mkdir(exist_ok=True)
    body = "".join(f"  {k}: {v}\n" for k, v in sources.items())
    weights = ", ".join(f"{k}: {{weight: {1 / len(sources)}}}" for k in sources)
    mix.write_text(f"sources:\n{body}stages:\n  pretrain:\n    mix: {{{weights}}}\n")
    return mix, LaunchRequest(
        scheduler="slurm",
        nodes=1,
        gpus_per_node=8,
        container=str(sif),
        walltime="01:00:00",
        output_dir=str(tmp_path / "run"),
        overrides=(
            "model.name=llm-jp-4-tiny-dense",
            f"data.mixture={mix}",
            "data.null_tokenizer_vocab_size=1000",
            # data.text_files keep their default (files that do not exist here): not used.
        ),
        workdir=str(tmp_path),
    )


def _dataset(prefix: Path) -> str:
    from tests.unit.test_indexed_data import make_dataset

    return make_dataset(prefix, docs=5)


def test_mixture_file_and_dataset_folders_are_bound(tmp_path, sif, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    a = _dataset(tmp_path / "ja" / "a")
    _dataset(tmp_path / "en" / "b")
    mix, req = _mixture_plan(tmp_path, sif, {"a": a, "b": "../en/b"})  # relative: the workdir
    plan = make_plan(dataclasses.replace(req, workdir=str(work)))
    want = {str(mix.parent), str(tmp_path / "ja"), str(tmp_path / "en"), str(work)}
    assert want <= set(plan.binds), plan.binds


def test_mixture_with_missing_or_truncated_datasets_is_refused(tmp_path, sif, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _dataset(tmp_path / "ja" / "a")
    _, req = _mixture_plan(tmp_path, sif, {"a": a, "gone": str(tmp_path / "gone")})
    with pytest.raises(LaunchError, match=r"source gone: .*gone\.bin not found"):
        make_plan(req)
    with open(a + ".bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    _, req = _mixture_plan(tmp_path, sif, {"a": a})
    with pytest.raises(LaunchError, match=r"source a: .*a\.bin is .* bytes but a\.idx describes"):
        make_plan(req)
