"""``llmjp-upcycle``: initialise an MoE training checkpoint from a dense one (Drop-Upcycling).

Examples::

    llmjp-upcycle --input runs/dense/checkpoints --output ckpt/moe-8x --experts 8 --topk 2 \\
        --expert-ffn 1536 --drop-ratio 0.5 --seed 1 --set parallel.ep=8
    llmjp-train --config ckpt/moe-8x/iter_0000000/config.yaml --output-dir runs/moe \\
        --set checkpoint.dir=checkpoints \\
        --set checkpoint.load=ckpt/moe-8x --set checkpoint.load_optimizer=false

Attention, embeddings, norms and the output layer are copied; each expert is a random slice of
``--expert-ffn`` units of the dense FFN, of which a fraction ``--drop-ratio`` is re-initialised
from a normal distribution with the mean and standard deviation of the weights it replaces
(0: plain upcycling); the router is drawn from N(0, --router-std^2). The input may be written
by any TP/PP/VPP layout; the output loads into any layout.
"""

from __future__ import annotations

import argparse
import sys

from megatron_llmjp.cli import doc_parser
from megatron_llmjp.config.loader import ConfigError

PROG = "llmjp-upcycle"


def _parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    p.add_argument(
        "--input",
        required=True,
        help="dense checkpoint: a root (its latest) or an iter_NNNNNNN directory",
    )
    p.add_argument("--output", required=True, help="MoE checkpoint root to create")
    p.add_argument("--experts", type=int, required=True, help="experts per layer (E)")
    p.add_argument("--topk", type=int, required=True, help="experts per token (1 <= K <= E)")
    p.add_argument(
        "--expert-ffn",
        type=int,
        required=True,
        help="intermediate size of each expert (F <= the dense FFN size)",
    )
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=0.5,
        help="fraction of each expert's units re-initialised (R, default 0.5 as in the paper; "
        "0: plain upcycling)",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of every random draw")
    p.add_argument(
        "--router-std",
        type=float,
        default=0.02,
        help="standard deviation of the fresh router weights (default 0.02; 0: all zero)",
    )
    p.add_argument(
        "--norm-topk-prob",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="renormalise the top-k routing probabilities (default: on for --topk > 1, as "
        "LLM-jp's MoE; off for --topk 1, where it would leave the router without gradient)",
    )
    p.add_argument(
        "--aux-loss-coeff",
        type=float,
        default=0.01,
        help="load-balancing loss coefficient of the MoE model (default 0.01)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the config written with the checkpoint, e.g. parallel.ep=8 "
        "(repeatable; the model comes from the dense checkpoint and the flags above)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_llmjp.upcycle.driver import UpcycleSpec, upcycle

    spec = UpcycleSpec(
        num_experts=args.experts,
        topk=args.topk,
        expert_ffn=args.expert_ffn,
        drop_ratio=args.drop_ratio,
        seed=args.seed,
        router_std=args.router_std,
        norm_topk_prob=args.norm_topk_prob,
        aux_loss_coeff=args.aux_loss_coeff,
    )
    try:
        report = upcycle(
            args.input,
            args.output,
            spec,
            overrides=args.set,
            force=args.force,
            progress=not args.quiet,
        )
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    m = report.model
    moe = m["moe"]
    print(
        f"{PROG}: wrote {report.output}: {m['num_layers']} layers x {moe['num_experts']} "
        f"experts (ffn {moe['moe_ffn_hidden_size']}, top-{moe['router_topk']}), "
        f"{report.tensors} tensors, {report.bytes / 2**20:.1f} MiB in {report.seconds:.1f} s"
    )
    for note in report.notes:
        print(f"{PROG}: note: {note}")
    print(
        f"{PROG}: train it with --config {report.output}/iter_0000000/config.yaml (or your own "
        f"config with this model section) --set checkpoint.load={report.output} "
        "--set checkpoint.load_optimizer=false"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
