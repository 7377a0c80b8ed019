"""Conversion speed and memory against copying the same bytes, in the same run.

Writes a random-weight Hugging Face directory of an LLM-jp-4-8B shape narrowed to about 1B
parameters (hidden 2048, FFN 7168, 16 heads / 8 KV heads of 128, the real 196,608 vocabulary,
4 layers by default), then, ``--runs`` times (3 by default), alternating, each command in a
fresh process (peak RSS from GNU time) after an untimed ``sync``:

* ``cp -r`` + ``sync`` of the HF directory (the baseline; GNU ``cp`` copies in the kernel),
* ``llmjp-convert hf-to-mcore`` of it (TP2 x PP2 target),
* ``cp -r`` + ``sync`` of the resulting checkpoint,
* ``llmjp-convert mcore-to-hf`` of that checkpoint,

and the start-up alone (Python, torch, the driver and torch's checkpoint package imported,
nothing converted), and prints every run, the medians, the ratios to the copy of the same
round (goal: at most 1.5x the copy time, peak RSS under 25% of the checkpoint size), the same
ratios with that round's start-up taken off (the part that grows with the model), and the
machine it ran on (cores, load average before and after, free memory, file system).
``--hidden 4096 --ffn 14336 --layers 8`` is the real 8B width (3.35 B parameters, 6.7 GB).
Parity is skipped for the timing (``--parity`` times it separately, once).

    .venv/bin/python tools/bench/convert.py [--runs 3] [--layers 4] [--hidden 2048] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_llmjp.convert import hf_config, mappings  # noqa: E402
from megatron_llmjp.convert.driver import _groups, _hf_shapes  # noqa: E402
from megatron_llmjp.convert.safetensors_io import Entry, ShardedWriter  # noqa: E402

# What every conversion pays before its first byte: the interpreter, torch, the driver and
# torch's distributed-checkpoint package, imported as ``llmjp-convert`` imports them.
STARTUP = "from megatron_llmjp.cli.convert import import_driver; import_driver()"


def _model(args) -> dict:
    from megatron_llmjp.checkpoint.manifest import model_section
    from megatron_llmjp.models.registry import get_model

    m = get_model(
        "llm-jp-4-8b",
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_attention_heads=args.hidden // 128,
        num_query_groups=8,
    )
    return model_section(m, 4, "none")


def write_random_hf(out: Path, model: dict, dtype: torch.dtype) -> int:
    """A random HF directory for ``model``, streamed tensor by tensor; returns parameters."""
    out.mkdir(parents=True)
    rules = mappings.rules_for(model)
    groups = _groups(rules, model["num_layers"])
    entries = []
    for _, group_rules, layer in groups:
        for r in group_rules:
            shapes = _hf_shapes(r, model, dtype)
            for index in mappings.indices(r, model, layer):
                names = mappings.hf_names(r, index)
                entries += [Entry(n, s, dtype) for n, s in zip(names, shapes, strict=True)]
    writer = ShardedWriter(out, entries, 2 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for e in entries:
        writer.write(e.name, (torch.randn(e.shape, generator=gen) * 0.02).to(dtype))
    writer.close()
    cfg = hf_config.to_hf_config(model, dtype, hf_config.LLMJP4_TOKEN_IDS)
    import json

    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(torch.Size(e.shape).numel() for e in entries)


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(seconds, peak RSS in GB, CPU seconds: user + system) of ``cmd`` in a fresh process.
    RSS and CPU come from GNU time (``/usr/bin/time -f "%M %U %S"``): a child's own
    ``ru_maxrss`` would start from this process's size, which it inherits at fork. The CPU
    time varies less than the wall time on a shared machine."""
    with tempfile.NamedTemporaryFile("r") as out:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%M %U %S", *cmd])
        dt = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        kb, user, system = out.read().split()[-3:]
        return dt, int(kb) * 1024 / 1e9, float(user) + float(system)


def step(cmd: list[str], size: float) -> tuple[float, float, float, float]:
    """(seconds, peak RSS GB, GB moved, CPU seconds) of one timed command."""
    dt, rss, cpu = timed(cmd)
    return dt, rss, size, cpu


def size_of(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def machine(path: Path) -> str:
    """Cores, load average, available memory and the file system holding ``path``."""
    import os

    meminfo = dict(
        line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line
    )
    avail = int(meminfo.get("MemAvailable", "0 kB").split()[0]) / 2**20
    total = int(meminfo.get("MemTotal", "0 kB").split()[0]) / 2**20
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    real = str(path.resolve())
    best = max(
        (m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
        key=lambda m: len(m[1]),
        default=["?", "?", "?", "?"],
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores, load average {load}, memory available {avail:.1f} of "
        f"{total:.1f} GiB, {real} on {best[0]} ({best[2]}, {best[3]})"
    )


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=7168)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--parity", action="store_true", help="also time a conversion with parity")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    root = Path(tempfile.mkdtemp(prefix="llmjp-bench-convert-", dir=args.workdir))
    convert = [sys.executable, "-m", "megatron_llmjp.cli.convert"]
    names = ("cp -r hf + sync", "hf-to-mcore", "cp -r checkpoint + sync", "mcore-to-hf")
    try:
        print(f"machine before: {machine(root)}", flush=True)
        model = _model(args)
        params = write_random_hf(root / "hf", model, dtype)
        gb = size_of(root / "hf") / 1e9
        print(f"model: {params / 1e9:.3f} B parameters, {gb:.2f} GB in {args.dtype}", flush=True)
        runs: list[dict[str, tuple[float, float, float]]] = []
        startups: list[float] = []  # the start-up alone, once per run
        for n in range(args.runs):
            for d in ("hf.copy", "mc", "mc.copy", "hf2"):
                shutil.rmtree(root / d, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            row: dict[str, tuple[float, float, float]] = {}
            row[names[0]] = step(
                ["sh", "-c", f"cp -r {root / 'hf'} {root / 'hf.copy'} && sync"], gb
            )
            subprocess.run(["sync"], check=True)
            row[names[1]] = step(
                [*convert, "hf-to-mcore", "--input", str(root / "hf"), "--output",
                 str(root / "mc"), "--set", "parallel.tp=2", "--set", "parallel.pp=2",
                 "--skip-parity", "--no-progress"], gb
            )  # fmt: skip
            mc_gb = size_of(root / "mc") / 1e9
            subprocess.run(["sync"], check=True)
            row[names[2]] = step(
                ["sh", "-c", f"cp -r {root / 'mc'} {root / 'mc.copy'} && sync"], mc_gb
            )
            subprocess.run(["sync"], check=True)
            row[names[3]] = step(
                [*convert, "mcore-to-hf", "--input", str(root / "mc"), "--output",
                 str(root / "hf2"), "--skip-parity", "--no-progress"], mc_gb
            )  # fmt: skip
            runs.append(row)
            startups.append(timed([sys.executable, "-c", STARTUP])[0])
            print(
                f"run {n + 1}: " + ", ".join(f"{k} {v[0]:.2f} s" for k, v in row.items()),
                flush=True,
            )
        if args.parity:
            shutil.rmtree(root / "hf3", ignore_errors=True)
            dt, rss, _ = timed(
                [*convert, "mcore-to-hf", "--input", str(root / "mc"), "--output",
                 str(root / "hf3"), "--no-progress"]
            )  # fmt: skip
            print(f"mcore-to-hf + parity: {dt:.2f} s, peak RSS {rss:.2f} GB")
        idle = timed([sys.executable, "-c", STARTUP])
        print(
            f"\n{'run':<5}{'step':<26}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}{'RSS/size':>10}"
        )
        for n, row in enumerate(runs):
            for name, (dt, rss, size, cpu) in row.items():
                print(
                    f"{n + 1:<5}{name:<26}{dt:>9.2f}{size / dt:>8.2f}{rss:>13.2f}"
                    f"{rss / size:>10.1%}{cpu:>8.2f}"
                )
        print(f"{'median':<31}" + "-" * 40)
        for name in names:
            dt = median([r[name][0] for r in runs])
            rss = median([r[name][1] for r in runs])
            cpu = median([r[name][3] for r in runs])
            size = runs[0][name][2]
            print(
                f"{'':<5}{name:<26}{dt:>9.2f}{size / dt:>8.2f}{rss:>13.2f}{rss / size:>10.1%}"
                f"{cpu:>8.2f}"
            )
        print(
            f"(start-up alone, python + imports of the driver and torch's checkpoint package: "
            f"peak RSS {idle[1]:.2f} GB, "
            f"{idle[0]:.2f} s, CPU {idle[2]:.2f} s)"
        )
        ratio = {
            "hf-to-mcore": [r[names[1]][0] / r[names[0]][0] for r in runs],
            "mcore-to-hf": [r[names[3]][0] / r[names[2]][0] for r in runs],
        }
        rss_share = {
            "hf-to-mcore": max(r[names[1]][1] / r[names[1]][2] for r in runs),
            "mcore-to-hf": max(r[names[3]][1] / r[names[3]][2] for r in runs),
        }
        print("\nratio to the copy of the same run (goal <= 1.5x):")
        for k, v in ratio.items():
            each = ", ".join(f"{x:.2f}x" for x in v)
            med = median([r[k][0] for r in runs]) / median(
                [r[names[0] if k == "hf-to-mcore" else names[2]][0] for r in runs]
            )
            print(
                f"  {k}: median {median(v):.2f}x (runs {each}; "
                f"median time / median copy {med:.2f}x)"
            )
        for k, copy in (("hf-to-mcore", names[0]), ("mcore-to-hf", names[2])):
            after = [(r[k][0] - s) / r[copy][0] for r, s in zip(runs, startups, strict=True)]
            each = ", ".join(f"{x:.2f}x" for x in after)
            print(
                f"  {k} less the start-up of its run (median {median(startups):.2f} s, "
                f"timed alone): median {median(after):.2f}x (runs {each})"
            )
        for k, copy in (("hf-to-mcore", names[0]), ("mcore-to-hf", names[2])):
            cpu = [r[k][3] / max(r[copy][3], 1e-3) for r in runs]
            print(f"  CPU seconds, {k} / copy: median {median(cpu):.1f}x")
        print(
            "peak RSS / checkpoint, worst run (goal < 25%): "
            + ", ".join(f"{k} {v:.1%}" for k, v in rss_share.items())
        )
        print(f"machine after: {machine(root)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
