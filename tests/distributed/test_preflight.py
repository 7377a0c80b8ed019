"""Preflight all-reduce check on 4 gloo ranks laid out as 2 "hosts" x 2 ranks: the groups it
measures, the same verdict on every rank, and a slow or dead node caught and named."""

from __future__ import annotations

import os
import time

import pytest

from megatron_llmjp.parallel.preflight import (
    GroupResult,
    GroupSpec,
    PreflightError,
    failure_message,
    judge,
    plan_groups,
)
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
HOSTS = ["hA", "hA", "hB", "hB"]


def test_groups_for_two_hosts():
    assert plan_groups(HOSTS) == [
        GroupSpec("node", "hA", (0, 1), ("hA",)),
        GroupSpec("node", "hB", (2, 3), ("hB",)),
        GroupSpec("rail", "local rank 0", (0, 2), ("hA", "hB")),
        GroupSpec("rail", "local rank 1", (1, 3), ("hA", "hB")),
        GroupSpec("world", "all ranks", (0, 1, 2, 3), ("hA", "hB")),
    ]


def test_groups_for_one_host_and_one_rank_per_host():
    assert [s.kind for s in plan_groups(["h"] * 4)] == ["node"]  # world == the node group
    assert [s.kind for s in plan_groups(["a", "b", "c"])] == ["rail"]  # world == rail 0
    assert plan_groups(["h"]) == []


def _result(kind, name, ranks, hosts, busbw, correct=True):
    return GroupResult(kind, name, ranks, hosts, 1 << 20, 1e-3, busbw, busbw, correct)


def test_judge_relative_absolute_and_corruption():
    results = [
        _result("node", "hA", (0, 1), ("hA",), 300.0),
        _result("node", "hB", (2, 3), ("hB",), 310.0),
        _result("node", "hC", (4, 5), ("hC",), 90.0),
        _result("world", "all ranks", (0, 1, 2, 3, 4, 5), ("hA", "hB", "hC"), 40.0),
    ]
    judged = judge(results, rel_tolerance=0.5)
    assert [bool(r.problem) for r in judged] == [False, False, True, False]
    assert "below 50% of the median 300 GB/s of the 3 node groups" in judged[2].problem
    message = failure_message(judged)
    assert message.startswith("preflight all-reduce check failed: node group hC (ranks 4,5)")
    assert message.endswith("suspect host(s): hC")
    floor = judge(results, min_busbw_gbps=50.0, rel_tolerance=0)
    assert [bool(r.problem) for r in floor] == [False, False, False, True]
    corrupt = judge([_result("node", "hA", (0, 1), ("hA",), 300.0, correct=False)])
    assert "wrong all-reduce result" in corrupt[0].problem
    assert failure_message(judge(results[:2])) is None


def _preflight(slow_rank: int | None, crash_rank: int | None, kwargs: dict):
    import torch
    import torch.distributed as dist

    from megatron_llmjp.parallel.preflight import run_preflight

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    real = dist.all_reduce

    def degraded(tensor, *args, **kw):
        # Fault injection on one rank's bulk all-reduces: a slow link, or a node that dies.
        if tensor.numel() > 1000:
            if rank == crash_rank:
                os._exit(1)
            if rank == slow_rank:
                time.sleep(0.25)
        return real(tensor, *args, **kw)

    dist.all_reduce = degraded
    torch.distributed.all_reduce = degraded
    try:
        try:
            results = run_preflight(host=HOSTS[rank], size_mb=1, iters=3, **kwargs)
            return "ok", [(r.kind, r.name, r.ranks, r.busbw_gbps, r.correct) for r in results]
        except PreflightError as e:
            return "error", str(e)
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_healthy_ranks_agree():
    results = spawn(_preflight, 4, None, None, {"rel_tolerance": 0.0}, timeout=120)
    assert all(status == "ok" for status, _ in results)
    first = results[0][1]
    assert all(r[1] == first for r in results), "every rank returns every group's result"
    assert [(kind, name, ranks) for kind, name, ranks, _, _ in first] == [
        (s.kind, s.name, s.ranks) for s in plan_groups(HOSTS)
    ]
    assert all(bw > 0 and correct for _, _, _, bw, correct in first)


def test_absolute_floor_fails_on_every_rank():
    results = spawn(_preflight, 4, None, None, {"min_busbw_gbps": 1e6}, timeout=120)
    assert [status for status, _ in results] == ["error"] * 4
    assert len({msg for _, msg in results}) == 1
    assert "below the minimum 1e+06 GB/s" in results[0][1]


def test_slow_node_is_named():
    """Rank 3 (on hB) sleeps before each bulk all-reduce: node hB and rail 1 drop far below
    their peers; the verdict names them and hB as the host they share."""
    results = spawn(_preflight, 4, 3, None, {"rel_tolerance": 0.5}, timeout=120)
    assert [status for status, _ in results] == ["error"] * 4
    message = results[0][1]
    assert "node group hB (ranks 2,3)" in message
    assert "rail group local rank 1 (ranks 1,3)" in message
    assert "node group hA" not in message
    assert message.endswith("suspect host(s): hB")


def _surviving_results(fn, world: int, *args, timeout: float) -> dict:
    """Like ``spawn``, for a run where a rank dies on purpose: what the others returned."""
    from tests.helpers.spawn import start, stop

    procs, queue = start(fn, world, *args)
    out = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world - 1 and time.monotonic() < deadline:
            rank, ok, value = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            out[rank] = value if ok else ("crashed", value)
    finally:
        stop(procs, 5)
    return out


def test_dead_rank_fails_fast():
    """Rank 3 exits during its first bulk all-reduce: every other rank stops with a
    PreflightError within seconds; its node peer names the group it was measuring."""
    t0 = time.monotonic()
    results = _surviving_results(_preflight, 4, None, 3, {"timeout_s": 20}, timeout=90)
    assert time.monotonic() - t0 < 60
    assert sorted(results) == [0, 1, 2]
    assert all(status == "error" for status, _ in results.values()), results
    assert "node group hB (ranks 2,3, hosts hB) failed on rank 2" in results[2][1]
    for rank in (0, 1):
        assert "lost contact with the other ranks" in results[rank][1]
