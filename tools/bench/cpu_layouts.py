"""Step time of parallel layouts against the single-process run, through the real entry point.

Each layout runs ``llmjp-train`` under torchrun on the same model, data and global batch; the
median step time over the steps after warm-up is compared with the single-process baseline of
the same invocation. On a 2-core CPU machine this measures overhead (gloo, schedules), not
speed-up: the figures are for spotting regressions, and the ratio is what to compare.

    .venv/bin/python tools/bench/cpu_layouts.py [--iters 8] [--model llm-jp-4-tiny-moe]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _train import torchrun_train

LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2xpp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2xpp2xep2": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"]),
}


def run_layout(world: int, overrides: list[str], base: list[str], out: Path) -> float:
    _, records = torchrun_train(world, base + overrides, out, port=29731)
    return statistics.median(r["step_time"] for r in records[2:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--model", default="llm-jp-4-tiny-moe")
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS))
    args = p.parse_args()
    base = [
        f"model.name={args.model}",
        "model.vocab_size=32768",
        "data.synthetic=true",
        f"train.iters={args.iters}",
        "train.seq_length=256",
        "train.global_batch_size=8",
        "logging.tensorboard=false",
    ]
    dense = "moe" not in args.model
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["single", *[n for n in args.layouts if n != "single"]]:
            world, overrides = LAYOUTS[name]
            if dense and any("ep=" in o for o in overrides):
                continue
            results[name] = run_layout(world, overrides, base, Path(tmp) / name)
            base_t = results["single"]
            print(
                f"{name:<14} world={world}  step {results[name]:.3f} s  "
                f"ratio to single {results[name] / base_t:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
