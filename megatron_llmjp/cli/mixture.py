"""``llmjp-mixture``: what a mixture file will sample, before a run starts.

Examples::

    llmjp-mixture plan configs/mixtures/quickstart.yaml
    llmjp-mixture plan configs/mixtures/quickstart.yaml --stage pretrain --tokens 1e9
    llmjp-mixture plan configs/mixtures/quickstart.yaml --config configs/quickstart.yaml

Per stage and source: natural tokens (in the indexed dataset), share of the stage, sampled
tokens and epochs over the source; a warning when a source repeats more than ``max_epochs``.
The budget is ``--tokens``, else the run's iters x global batch x sequence length
(``--config``), else the stage's ``tokens``, else the stage's natural total.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.config.mixture_file import load_mixture
from megatron_llmjp.data.mixture import plan_stage

PROG = "llmjp-mixture"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ")[1])
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="tokens per stage and source")
    plan.add_argument("file", help="mixture YAML")
    plan.add_argument("--stage", action="append", help="only this stage (repeatable)")
    plan.add_argument("--tokens", type=float, help="token budget of each planned stage")
    plan.add_argument("--config", help="a run config whose iters x batch x seq is the budget")
    plan.add_argument("--json", action="store_true")
    return p


def _table(plans) -> str:
    head = (
        f"{'stage':<10} {'source':<10} {'natural':>14} {'share':>7} {'sampled':>14} {'epochs':>7}"
    )
    lines = [head, "-" * len(head)]
    for plan in plans:
        for r in plan.rows:
            lines.append(
                f"{r.stage:<10} {r.source:<10} {r.natural_tokens:>14,} {r.share:>7.1%} "
                f"{r.sampled_tokens:>14,} {r.epochs:>7.2f}"
            )
        lines.append(
            f"{plan.stage:<10} {'(budget)':<10} {'':>14} {'':>7} {plan.budget:>14,}  "
            f"from {plan.budget_from}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        mixture = load_mixture(args.file)
        names = args.stage or list(mixture.stages)
        stages = [mixture.stage(n) for n in names]
        budget, source = (int(args.tokens), "--tokens") if args.tokens else (None, None)
        if budget is None and args.config:
            t = build_config(args.config).train
            budget = t.iters * t.global_batch_size * t.seq_length
            source = f"{args.config} (iters x global batch x seq length)"
        plans = [plan_stage(mixture, s, budget, budget_from=source) for s in stages]
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(p) for p in plans], indent=2))
    else:
        print(_table(plans))
    for plan in plans:
        for w in plan.warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
