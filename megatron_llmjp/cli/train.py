"""``llmjp-train``: train a model from a YAML config on CPU (gloo) or GPU (NCCL).

Start one process per rank with torchrun, mpirun or srun; ranks are read from their variables.
Configuration errors are reported in one line (exit 2) before any process group is created.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_llmjp.cli import add_overrides
from megatron_llmjp.config.loader import ConfigError, build_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="llmjp-train",
        description="Train a model from a YAML config on CPU (gloo) or GPU (NCCL).",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--output-dir", help="where the run writes (overrides output_dir)")
    add_overrides(p, "dotted override, repeatable, e.g. --set parallel.tp=2 --set train.iters=20")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (or saved and stopped on an exit signal), 2 bad config or checkpoint,
    3 stopped on a non-finite step, 4 a peer rank crashed or hung, 5 the preflight failed."""
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
    from megatron_llmjp.parallel.preflight import PreflightError
    from megatron_llmjp.training.faults import NonFiniteError, PeerFailure
    from megatron_llmjp.training.trainer import run

    try:
        run(cfg, info)
    except ConfigError as e:  # a checkpoint that fails to load (every rank raises it)
        if info.rank == 0:
            print(f"llmjp-train: error: {e}", file=sys.stderr)
        return 2
    except PreflightError as e:  # every rank raises the same verdict
        if info.rank == 0:
            print(f"llmjp-train: error: {e}", file=sys.stderr, flush=True)
        return 5
    except NonFiniteError as e:
        if info.rank == 0:
            print(f"llmjp-train: stopped: {e}", file=sys.stderr)
        return 3
    except PeerFailure as e:
        print(f"llmjp-train: error: {e}", file=sys.stderr, flush=True)
        # Leave now: interpreter teardown may block on the dead peer's sockets.
        sys.stderr.flush()
        os._exit(4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
