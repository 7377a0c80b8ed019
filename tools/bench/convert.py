"""Conversion speed and memory against copying the same bytes, in the same run.

Writes a random-weight Hugging Face directory of an LLM-jp-4-8B shape narrowed to about 1B
parameters (hidden 2048, FFN 7168, 16 heads / 8 KV heads of 128, the real 196,608 vocabulary,
4 layers by default), then times, each in a fresh process (peak RSS from ``wait4``):

* ``cp -r`` + ``sync`` of the HF directory (the baseline; GNU ``cp`` copies in the kernel),
* ``llmjp-convert hf-to-mcore`` of it (TP2 x PP2 target),
* ``cp -r`` + ``sync`` of the resulting checkpoint,
* ``llmjp-convert mcore-to-hf`` of that checkpoint,

and prints seconds, GB/s, peak RSS and the ratios to the copy (goal: conversion at most 1.5x
the copy time, peak RSS under 25% of the checkpoint size). Parity is skipped for the timing
(it loads both models; ``--parity`` times it separately).

    .venv/bin/python tools/bench/convert.py [--layers 4] [--hidden 2048] [--dtype bf16]
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


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of ``cmd`` in a fresh process. The RSS comes from GNU time
    (``/usr/bin/time -f %M``): a child's own ``ru_maxrss`` would start from this process's
    size, which it inherits at fork."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-o", rss.name, "-f", "%M", *cmd])
        dt = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}")
        return dt, int(rss.read().split()[-1]) * 1024 / 1e9


def size_of(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    try:
        model = _model(args)
        params = write_random_hf(root / "hf", model, dtype)
        gb = size_of(root / "hf") / 1e9
        print(f"model: {params / 1e9:.3f} B parameters, {gb:.2f} GB in {args.dtype}", flush=True)
        rows = []
        copy_hf = timed(["sh", "-c", f"cp -r {root / 'hf'} {root / 'hf.copy'} && sync"])
        rows.append(("cp -r hf + sync", *copy_hf, gb))
        to_mcore = timed(
            [*convert, "hf-to-mcore", "--input", str(root / "hf"), "--output", str(root / "mc"),
             "--set", "parallel.tp=2", "--set", "parallel.pp=2", "--skip-parity", "--no-progress"]
        )  # fmt: skip
        rows.append(("hf-to-mcore", *to_mcore, gb))
        mc_gb = size_of(root / "mc") / 1e9
        copy_mc = timed(["sh", "-c", f"cp -r {root / 'mc'} {root / 'mc.copy'} && sync"])
        rows.append(("cp -r checkpoint + sync", *copy_mc, mc_gb))
        to_hf = timed(
            [*convert, "mcore-to-hf", "--input", str(root / "mc"), "--output",
             str(root / "hf2"), "--skip-parity", "--no-progress"]
        )  # fmt: skip
        rows.append(("mcore-to-hf", *to_hf, mc_gb))
        if args.parity:
            rows.append(
                ("mcore-to-hf + parity", *timed(
                    [*convert, "mcore-to-hf", "--input", str(root / "mc"), "--output",
                     str(root / "hf3"), "--no-progress"]
                ), mc_gb)
            )  # fmt: skip
        idle = timed([sys.executable, "-c", "import megatron_llmjp.convert.driver"])
        print(f"\n{'step':<26}{'seconds':>9}{'GB/s':>8}{'peak RSS GB':>13}{'RSS/size':>10}")
        for name, dt, rss, size in rows:
            print(f"{name:<26}{dt:>9.2f}{size / dt:>8.2f}{rss:>13.2f}{rss / size:>10.1%}")
        print(f"(python + imports alone: peak RSS {idle[1]:.2f} GB)")
        print(
            f"\nratio to copy: hf-to-mcore {to_mcore[0] / copy_hf[0]:.2f}x, "
            f"mcore-to-hf {to_hf[0] / copy_mc[0]:.2f}x (goal <= 1.5x); peak RSS / checkpoint: "
            f"mcore-to-hf {to_hf[1] / mc_gb:.1%}, hf-to-mcore {to_mcore[1] / gb:.1%} (goal < 25%)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
