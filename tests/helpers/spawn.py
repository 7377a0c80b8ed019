"""Run a function on N fresh CPU/gloo ranks, forked from an interpreter that imported megatron once.

Forking skips the 10+ s of imports each torchrun rank would pay; each child builds its own
gloo process group on a free port. A child's exception comes back with its traceback, and a
hang is killed after ``timeout`` seconds instead of stalling the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, args, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        import torch

        torch.set_num_threads(1)
        queue.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))


def start(fn: Callable[..., Any], world: int, *args: Any):
    """Fork ranks 0..world-1 running ``fn(*args)``; returns (processes, result queue), where
    each rank puts ``(rank, ok, value or traceback)``."""
    import torch

    if torch.cuda.is_initialized():  # a flag: asks the driver nothing
        raise RuntimeError(
            "CUDA is initialised in this process: forked ranks cannot use it. The multi-rank "
            "tests run on CPU (LLMJP_DEVICE=cpu, set by tests/conftest.py unless `-m gpu`)"
        )
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world, port, args, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs, queue


def stop(procs: list, grace: float) -> None:
    """Join the ranks, killing any still alive after ``grace`` seconds each."""
    for p in procs:
        p.join(timeout=grace)
        if p.is_alive():
            p.kill()
            p.join()


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """``fn(*args)`` on ranks 0..world-1; returns the per-rank results in rank order."""
    procs, queue = start(fn, world, *args)
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except Exception as e:  # queue.Empty: a hang or a crash without a report
        errors.append(
            f"no result from ranks {sorted(set(range(world)) - set(results))} "
            f"within {timeout:.0f} s ({type(e).__name__})"
        )
    finally:
        stop(procs, 5 if not errors else 0.1)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
