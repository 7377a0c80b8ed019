"""``llmjp-train``: train a model from a YAML config on CPU (gloo) or GPU (NCCL).

Start one process per rank with torchrun, mpirun or srun; ranks are read from their variables.
Configuration errors are reported in one line (exit 2) before any process group is created.
"""

from __future__ import annotations

import argparse
import sys

from megatron_llmjp.config.loader import ConfigError, build_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="llmjp-train",
        description="Train a model from a YAML config on CPU (gloo) or GPU (NCCL).",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--output-dir", help="where the run writes (overrides output_dir)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set parallel.tp=2 --set train.iters=20",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_llmjp.parallel.dist import discover_ranks

    info = discover_ranks()
    try:
        cfg = build_config(args.config, args.overrides, args.output_dir)
        from megatron_llmjp.training.trainer import check_runtime

        check_runtime(cfg, info)
    except ConfigError as e:
        if info.rank == 0:
            print(f"llmjp-train: error: {e}", file=sys.stderr)
        return 2
    from megatron_llmjp.training.trainer import run

    run(cfg, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
