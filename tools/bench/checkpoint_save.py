"""How long checkpoint saves block training: the first save against later ones, and
asynchronous saves against synchronous ones.

Runs ``llmjp-train`` under torchrun on one model and layout, saving every ``--interval``
steps, alternately with ``checkpoint.async_save=false`` (the baseline) and ``true``, for each
distributed-optimizer form of ``--forms`` (``checkpoint.optimizer_sharding``: by default
``dp_reshardable``, whose saves write each rank's own shards, and ``fully_reshardable``, which
gathers the state onto data-parallel rank 0 inside the save call), ``--repeats`` times each,
plus one run without saves for the step time. For each save it reads the seconds the trainer
reports training was blocked: the save call itself, plus for an asynchronous save the per-step
completion checks and the publishing at a later step (saves published only after the last step
are left out). Prints medians with min-max, the ratios first/later and async/sync per form from
this invocation, and the machine with its load average at the start and the end (on a shared
machine only the ratios of one invocation compare).

    .venv/bin/python tools/bench/checkpoint_save.py [--world 2] [--hidden 512] [--layers 8]
        [--forms dp_reshardable fully_reshardable]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

from _train import load_average, machine, spread, torchrun_train

SAVED = re.compile(r"checkpoint of iteration (\d+): training blocked ([0-9.]+) s")
PUBLISHED = re.compile(r"checkpoint of iteration (\d+) published: training blocked ([0-9.]+) s")


def blocked_per_save(stdout: str) -> dict[int, float]:
    """Iteration -> seconds training was blocked by that save (asynchronous saves: only those
    published during training, with their completion checks and publishing)."""
    saved = {int(i): float(t) for i, t in SAVED.findall(stdout)}
    published = {int(i): float(t) for i, t in PUBLISHED.findall(stdout)}
    if "in the background" not in stdout:
        return saved
    return {i: t + published[i] for i, t in saved.items() if i in published}


def save_calls(stdout: str) -> list[float]:
    """Seconds of the save calls alone (for an asynchronous save: without the completion
    checks and the publishing)."""
    return [float(t) for _, t in SAVED.findall(stdout)]


def run(world: int, overrides: list[str], out: Path) -> tuple[dict[int, float], float, float, list]:
    """(blocked seconds per saved iteration, median step time, checkpoint MiB, save-call
    seconds)."""
    stdout, records = torchrun_train(world, overrides, out, port=29733)
    step = statistics.median(r["step_time"] for r in records[1:])
    size = sum(p.stat().st_size for p in out.rglob("iter_*/*") if p.is_file())
    saves = max(1, len(list(out.glob("ckpt/iter_*"))))
    return blocked_per_save(stdout), step, size / saves / 2**20, save_calls(stdout)


FORMS = ("dp_reshardable", "fully_reshardable")


def report(form: str, first: dict, later: dict, steps: dict, calls: dict, pairs: list) -> None:
    """The lines of one optimizer form: per mode, then the async/sync ratios."""
    med = {m: statistics.median(v) if v else float("nan") for m, v in later.items()}
    med_first = {m: statistics.median(v) if v else float("nan") for m, v in first.items()}
    print(f"checkpoint.optimizer_sharding={form}:")
    for mode in ("sync", "async"):
        print(
            f"  {mode:<5} first save blocked {spread(first[mode])}, later saves "
            f"{spread(later[mode])}: first/later {med_first[mode] / med[mode]:.2f}; "
            f"save call alone (later saves) {spread(calls[mode])}; "
            f"step time {spread(steps[mode])}"
        )
    print(
        f"  async/sync blocked: later saves {med['async'] / med['sync']:.2f}, first save "
        f"{med_first['async'] / med_first['sync']:.2f}"
    )
    # The load changes from run to run: the ratio within each pair of adjacent runs as well.
    ratios = [q["async"] / q["sync"] for q in pairs if len(q) == 2]
    print(
        "  async/sync blocked per adjacent pair of runs (later saves): "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + (f"; median {statistics.median(ratios):.2f}" if ratios else "")
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iters", type=int, default=14)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="runs per mode and form, alternated")
    p.add_argument("--model", default="llm-jp-4-tiny-dense")
    p.add_argument(
        "--forms",
        nargs="+",
        choices=FORMS,
        default=list(FORMS),
        help="checkpoint.optimizer_sharding values to compare (default: both)",
    )
    p.add_argument("--set", action="append", default=[], help="extra override, repeatable")
    args = p.parse_args()
    print(f"machine at start: {machine()}", flush=True)
    base = [
        f"model.name={args.model}",
        f"model.hidden_size={args.hidden}",
        f"model.ffn_hidden_size={3 * args.hidden}",
        f"model.num_layers={args.layers}",
        "model.vocab_size=32768",
        "data.synthetic=true",
        f"train.iters={args.iters}",
        "train.seq_length=256",
        "train.global_batch_size=8",
        "logging.tensorboard=false",
        *args.set,
    ]

    def per_mode() -> dict[str, list[float]]:
        return {"sync": [], "async": []}

    first = {f: per_mode() for f in args.forms}
    later = {f: per_mode() for f in args.forms}
    steps = {f: per_mode() for f in args.forms}
    call_times = {f: per_mode() for f in args.forms}
    # Per form and repeat: median later-save blocking per mode.
    pairs: dict[str, list[dict[str, float]]] = {f: [] for f in args.forms}
    mib = {f: 0.0 for f in args.forms}
    with tempfile.TemporaryDirectory() as tmp:
        _, plain_step, _, _ = run(args.world, base, Path(tmp) / "none")
        for k in range(args.repeats):
            # Forms and modes alternate from repeat to repeat (the load drifts).
            forms = args.forms if k % 2 == 0 else args.forms[::-1]
            for form in forms:
                for mode in ("sync", "async") if k % 2 == 0 else ("async", "sync"):
                    out = Path(tmp) / f"{form}-{mode}{k}"
                    ckpt = [
                        f"checkpoint.dir={out / 'ckpt'}",
                        f"checkpoint.interval={args.interval}",
                        f"checkpoint.async_save={mode == 'async'}",
                        f"checkpoint.optimizer_sharding={form}",
                    ]
                    blocked, step, mib[form], calls = run(args.world, base + ckpt, out)
                    call_times[form][mode] += calls[1:-1]  # neither the first nor the final save
                    # The save after the last step waits for nothing but the end of the run.
                    blocked.pop(args.iters, None)
                    its = sorted(blocked)
                    if its and its[0] == args.interval:
                        first[form][mode].append(blocked[its[0]])
                        its = its[1:]
                    later[form][mode] += [blocked[i] for i in its]
                    if k == len(pairs[form]):
                        pairs[form].append({})
                    pairs[form][k][mode] = statistics.median(
                        [blocked[i] for i in its] or [float("nan")]
                    )
                    steps[form][mode].append(step)
                    print(
                        f"  run {k + 1} {form} {mode:<5}: blocked per save "
                        + ", ".join(f"it{i} {t:.2f} s" for i, t in sorted(blocked.items())),
                        flush=True,
                    )
    print(
        f"model {args.model} hidden={args.hidden} layers={args.layers} world={args.world}, "
        f"a save every {args.interval} steps, {args.repeats} runs per mode and form; checkpoint "
        + ", ".join(f"{f} {mib[f]:.0f} MiB" for f in args.forms)
    )
    print(f"step time   no saves {spread([plain_step])}")
    for form in args.forms:
        report(form, first[form], later[form], steps[form], call_times[form], pairs[form])
    if len(args.forms) > 1:
        ratio = {
            f: statistics.median(later[f]["async"] or [float("nan")])
            / statistics.median(later[f]["sync"] or [float("nan")])
            for f in args.forms
        }
        print(
            "async/sync blocked, later saves, by form: "
            + ", ".join(f"{f} {r:.2f}" for f, r in ratio.items())
        )
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
