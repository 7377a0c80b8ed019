"""``llmjp-params``: parameter counts of a registry model, computed from its config alone.

Examples::

    llmjp-params llm-jp-4-32b-a3b
    llmjp-params llm-jp-4-8b --json
    llmjp-params llm-jp-4-tiny-moe --set model.num_layers=2
    llmjp-params --list

No model is built and neither torch nor megatron is imported, so this runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from megatron_llmjp.config.loader import ConfigError, build_dataclass, parse_overrides
from megatron_llmjp.config.schema import ModelConfig, RunConfig
from megatron_llmjp.models.params import ParamCounts, count_parameters, padded_vocab_size
from megatron_llmjp.models.registry import MODELS

PROG = "llmjp-params"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Print total, embedding, non-embedding and active parameter counts of a "
        "registry model (embedding = input embedding only; the untied output layer is "
        "non-embedding; active = what one token uses).",
    )
    p.add_argument("name", nargs="?", help="registry name (see --list)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="list the registry names and sources")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="model.KEY=VALUE",
        help="override a model field of the registry entry (repeatable)",
    )
    return p


def resolve_model(name: str, overrides: list[str]) -> ModelConfig:
    """The registry entry ``name`` with ``model.key=value`` overrides, type-checked and
    validated like a training config. Raises ``ConfigError``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    data = parse_overrides(overrides)
    other = sorted(set(data) - {"model"})
    if other:
        raise ConfigError(
            f"--set {other[0]}: only model.KEY=VALUE overrides apply to parameter counts"
        )
    model_data = data.get("model", {})
    if not isinstance(model_data, dict):
        raise ConfigError("--set model: expected model.KEY=VALUE")
    if "name" in model_data:
        raise ConfigError("--set model.name: give the model as the NAME argument instead")
    where = {f"model.{k}": "--set" for k in model_data}
    m = build_dataclass(ModelConfig, model_data, "model.", where, base=MODELS[name])
    # Reuse the training config's model checks (GQA divisibility, MoE fields, ...): the only
    # section a parameter count uses.
    from megatron_llmjp.config.validate import validate_static

    validate_static(RunConfig(model=m), uses=("model",))
    return m


def as_json(m: ModelConfig, c: ParamCounts) -> dict:
    return {
        "name": m.name,
        "family": m.family,
        "total": c.total,
        "embedding": c.embedding,
        "non_embedding": c.non_embedding,
        "active": c.active,
        "per_layer": dict(c.per_layer),
        "padded_vocab_size": padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
    }


def print_human(m: ModelConfig, c: ParamCounts, out: TextIO) -> None:
    print(f"{m.name} ({m.family})", file=out)
    if m.source:
        print(f"source: {m.source}", file=out)
    rows = [
        ("total", c.total),
        ("embedding", c.embedding),
        ("non-embedding", c.non_embedding),
        ("active", c.active),
    ]
    rows += [(f"  {k}", v) for k, v in c.per_layer.items()]
    # One set of column widths so the per-layer rows line up with the totals.
    label_w = max(len(label) for label, _ in rows)
    num_w = max(len(f"{n:,}") for _, n in rows)

    def line(label: str, n: int) -> None:
        print(f"{label:<{label_w}}  {n:>{num_w},}  {n / 1e9:>9.3f}B", file=out)

    for label, n in rows[:4]:
        line(label, n)
    print(f"per layer (x{m.num_layers}):", file=out)
    for label, n in rows[4:]:
        line(label, n)
    pv = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    print(f"vocab {m.vocab_size:,} (padded for tp=1: {pv:,})", file=out)


def print_list(out: TextIO) -> None:
    w = max(len(n) for n in MODELS)
    for name, m in MODELS.items():
        print(f"{name:<{w}}  {m.source}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return instead of exiting
        return int(e.code or 0)
    if args.list:
        print_list(sys.stdout)
        return 0
    if args.name is None:
        print(f"{PROG}: give a model NAME or --list", file=sys.stderr)
        return 2
    try:
        m = resolve_model(args.name, args.set)
    except ConfigError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    counts = count_parameters(m)
    if args.json:
        print(json.dumps(as_json(m, counts)))
    else:
        print_human(m, counts, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
