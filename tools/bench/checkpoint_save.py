"""How long a checkpoint save blocks training: synchronous against asynchronous saves.

Runs ``llmjp-train`` under torchrun twice on the same model and layout, saving every
``--interval`` steps, once with ``checkpoint.async_save=false`` (the baseline) and once with
``true``; reads the "training blocked" time the trainer prints for each save and the median
step time, and prints the ratios. Both runs also train without saving for reference.

    .venv/bin/python tools/bench/checkpoint_save.py [--world 2] [--hidden 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from _train import torchrun_train

BLOCKED = re.compile(r"training blocked ([0-9.]+) s")


def run(world: int, overrides: list[str], out: Path) -> tuple[list[float], float, float]:
    """(blocked seconds per save, median step time, checkpoint MiB)."""
    stdout, records = torchrun_train(world, overrides, out, port=29733)
    blocked = [float(x) for x in BLOCKED.findall(stdout)]
    step = statistics.median(r["step_time"] for r in records[1:])
    size = sum(p.stat().st_size for p in out.rglob("iter_*/*") if p.is_file())
    saves = max(1, len(list(out.glob("ckpt/iter_*"))))
    return blocked, step, size / saves / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--interval", type=int, default=3)
    args = p.parse_args()
    base = [
        "model.name=llm-jp-4-tiny-dense",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={3 * args.hidden}",
        f"model.num_layers={args.layers}",
        "model.vocab_size=32768",
        "data.synthetic=true",
        f"train.iters={args.iters}",
        "train.seq_length=256",
        "train.global_batch_size=8",
        "logging.tensorboard=false",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        _, plain_step, _ = run(args.world, base, Path(tmp) / "none")
        rows = {}
        for mode in ("sync", "async"):
            out = Path(tmp) / mode
            ckpt = [
                f"checkpoint.dir={out / 'ckpt'}",
                f"checkpoint.interval={args.interval}",
                f"checkpoint.async_save={mode == 'async'}",
            ]
            rows[mode] = run(args.world, base + ckpt, out)
    sync_blocked = statistics.median(rows["sync"][0])
    print(f"no saves      step {plain_step:.3f} s")
    for mode, (blocked, step, mib) in rows.items():
        med = statistics.median(blocked)
        print(
            f"{mode:<6} saves  step {step:.3f} s, checkpoint {mib:.0f} MiB, blocked per save "
            f"median {med:.3f} s (n={len(blocked)}), ratio to sync {med / sync_blocked:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
