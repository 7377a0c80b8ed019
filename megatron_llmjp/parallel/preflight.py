"""Preflight: time all-reduces over every node, every rail and the world before training starts.

A node with a degraded NVLink/PCIe path, a NIC running at a fraction of its rate or a wrong
result turns a 500-rank job into one that runs at the speed of its worst link, or dies at the
first collective hours in. Here each rank group is measured on its own:

- ``node``: the ranks of one host (intra-node links), all hosts at once;
- ``rail``: the ranks with the same local index on every host (one NIC per GPU on ABCI 3.0),
  all rails at once;
- ``world``: every rank.

Bus bandwidth follows nccl-tests: ``algbw = bytes / time`` and ``busbw = algbw * 2 (n - 1) / n``
for a ring all-reduce over n ranks, so groups of different sizes compare. A group fails when
its result is wrong, when it is below an absolute floor, or when it is below
``rel_tolerance`` times the median of its kind (the check that finds one slow node among
equals without knowing the hardware). Every rank receives every result, so every rank
raises the same ``PreflightError``, naming the groups and the hosts they share.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

KINDS = ("node", "rail", "world")


class PreflightError(RuntimeError):
    """A rank group failed the all-reduce check (message names the groups and hosts)."""


@dataclass(frozen=True)
class GroupSpec:
    kind: str
    name: str
    ranks: tuple[int, ...]
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class GroupResult:
    kind: str
    name: str
    ranks: tuple[int, ...]
    hosts: tuple[str, ...]
    bytes: int
    seconds: float
    """Time of one all-reduce on the group's slowest rank (mean over the timed iterations)."""
    algbw_gbps: float
    busbw_gbps: float
    correct: bool
    problem: str = ""
    """Why the group failed (empty when it passed)."""


def plan_groups(hosts: list[str]) -> list[GroupSpec]:
    """Rank groups for ``hosts[rank]``; a rank's local index counts ranks before it on its host.

    Groups of one rank are skipped (nothing to measure), and a group equal to one already
    listed (a single-host world) is measured once.
    """
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    local = {r: i for ranks in by_host.values() for i, r in enumerate(ranks)}
    by_rail: dict[int, list[int]] = {}
    for rank in range(len(hosts)):
        by_rail.setdefault(local[rank], []).append(rank)
    specs = [GroupSpec("node", host, tuple(r), (host,)) for host, r in by_host.items()]
    if len(by_host) > 1:
        specs += [
            GroupSpec("rail", f"local rank {i}", tuple(r), tuple(hosts[x] for x in r))
            for i, r in sorted(by_rail.items())
        ]
    specs.append(GroupSpec("world", "all ranks", tuple(range(len(hosts))), tuple(by_host)))
    seen: set[tuple[int, ...]] = set()
    out = []
    for spec in specs:
        if len(spec.ranks) > 1 and spec.ranks not in seen:
            seen.add(spec.ranks)
            out.append(spec)
    return out


def ranks_text(ranks: tuple[int, ...]) -> str:
    if len(ranks) > 2 and ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    if len(ranks) > 6:
        return ",".join(map(str, ranks[:4])) + f",... ({len(ranks)} ranks)"
    return ",".join(map(str, ranks))


def judge(
    results: list[GroupResult], min_busbw_gbps: float = 0.0, rel_tolerance: float = 0.5
) -> list[GroupResult]:
    """Results with ``problem`` filled in for the groups that fail (pure; same on every rank)."""
    medians = {}
    for kind in KINDS:
        bws = [r.busbw_gbps for r in results if r.kind == kind]
        if len(bws) > 1:
            medians[kind] = (statistics.median(bws), len(bws))
    out = []
    for r in results:
        problem = ""
        if not r.correct:
            problem = "wrong all-reduce result (data corrupted on a link)"
        elif min_busbw_gbps > 0 and r.busbw_gbps < min_busbw_gbps:
            problem = (
                f"bus bandwidth {r.busbw_gbps:.3g} GB/s is below the minimum "
                f"{min_busbw_gbps:g} GB/s"
            )
        elif rel_tolerance > 0 and r.kind in medians:
            median, n = medians[r.kind]
            if r.busbw_gbps < rel_tolerance * median:
                problem = (
                    f"bus bandwidth {r.busbw_gbps:.3g} GB/s is below {rel_tolerance:.0%} of the "
                    f"median {median:.3g} GB/s of the {n} {r.kind} groups"
                )
        out.append(GroupResult(**{**r.__dict__, "problem": problem}))
    return out


def failure_message(results: list[GroupResult]) -> str | None:
    bad = [r for r in results if r.problem]
    if not bad:
        return None
    lines = [f"{r.kind} group {r.name} (ranks {ranks_text(r.ranks)}): {r.problem}" for r in bad]
    suspects = set(bad[0].hosts)
    for r in bad[1:]:
        suspects &= set(r.hosts)
    hint = f"; suspect host(s): {', '.join(sorted(suspects))}" if suspects else ""
    return "preflight all-reduce check failed: " + "; ".join(lines) + hint


def _measure(
    group, spec: GroupSpec, numel: int, iters: int, warmup: int, device
) -> tuple[float, bool]:
    """(slowest rank's seconds per all-reduce, result correct) for this rank's ``group``."""
    n = len(spec.ranks)
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(buf, group=group)
    # Integers below 2**24 are exact in float32: every element must equal the group size.
    correct = bool((buf == n).all())
    buf.zero_()
    for _ in range(max(warmup - 1, 0)):
        dist.all_reduce(buf, group=group)
    _sync(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf, group=group)
    _sync(device)
    elapsed = torch.tensor([(time.perf_counter() - t0) / iters], dtype=torch.float64)
    correct = correct and bool((buf == 0).all())
    elapsed = elapsed.to(device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return float(elapsed.item()), correct


def _cause(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sync(device) -> None:
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def run_preflight(
    *,
    size_mb: float | None = None,
    iters: int = 5,
    warmup: int = 2,
    min_busbw_gbps: float = 0.0,
    rel_tolerance: float = 0.5,
    timeout_s: float = 120.0,
    host: str | None = None,
    verbose: bool = True,
) -> list[GroupResult]:
    """Measure all-reduce bus bandwidth per rank group; every rank calls it after the default
    process group exists. Returns all groups' results on every rank; raises ``PreflightError``
    (on every rank) if a group fails.

    ``size_mb`` defaults to 256 MiB with NCCL (enough to reach link bandwidth) and 4 MiB on CPU
    (gloo). Collectives here time out after ``timeout_s`` so a dead link fails the job within
    minutes. ``host`` overrides this rank's host name (tests lay out several "hosts" on one
    machine).
    """
    if not dist.is_initialized():
        raise RuntimeError("run_preflight needs an initialised default process group")
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mb = size_mb if size_mb is not None else (256.0 if nccl else 4.0)
    numel = max(int(mb * 2**20) // 4, 1)
    timeout = timedelta(seconds=timeout_s)
    # Results travel as Python objects over gloo, whatever the data backend.
    control = dist.new_group(backend="gloo", timeout=timeout)
    hosts: list = [None] * world
    dist.all_gather_object(hosts, host or socket.gethostname(), group=control)
    specs = plan_groups(hosts)
    groups = [dist.new_group(list(s.ranks), timeout=timeout) for s in specs]
    mine: list[GroupResult] = []

    def on_control(what: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # a peer died or hung in its own group: this rank cannot go on
            raise PreflightError(
                f"preflight: rank {rank} lost contact with the other ranks ({what}): "
                f"{_cause(e)}; another rank failed first, see its error"
            ) from e

    gathered: list = [None] * world
    try:
        for kind in KINDS:
            # Groups of one kind are disjoint and run at once; kinds run one after another.
            on_control(f"before the {kind} groups", lambda: dist.barrier(group=control))
            for spec, group in zip(specs, groups, strict=True):
                if spec.kind != kind or rank not in spec.ranks:
                    continue
                try:
                    seconds, correct = _measure(group, spec, numel, iters, warmup, device)
                except Exception as e:  # a dead peer or a timeout: name the group
                    raise PreflightError(
                        f"preflight all-reduce in {spec.kind} group {spec.name} (ranks "
                        f"{ranks_text(spec.ranks)}, hosts {', '.join(spec.hosts)}) failed on "
                        f"rank {rank}: {_cause(e)}"
                    ) from e
                if rank == spec.ranks[0]:
                    nbytes = numel * 4
                    algbw = nbytes / seconds / 1e9
                    mine.append(
                        GroupResult(
                            spec.kind,
                            spec.name,
                            spec.ranks,
                            spec.hosts,
                            nbytes,
                            seconds,
                            algbw,
                            algbw * 2 * (len(spec.ranks) - 1) / len(spec.ranks),
                            correct,
                        )
                    )
        on_control("sharing results", lambda: dist.all_gather_object(gathered, mine, group=control))
    finally:
        for group in [*groups, control]:
            with contextlib.suppress(Exception):  # a broken group must not mask the error
                dist.destroy_process_group(group)
    flat = sorted(
        (r for part in gathered for r in part), key=lambda r: (KINDS.index(r.kind), r.ranks)
    )
    results = judge(flat, min_busbw_gbps, rel_tolerance)
    if verbose and rank == 0:
        _print_report(results, mb, iters, "nccl" if nccl else "gloo")
    message = failure_message(results)
    if message:
        raise PreflightError(message)
    return results


def _print_report(results: list[GroupResult], mb: float, iters: int, backend: str) -> None:
    print(f"[llmjp] preflight: all-reduce of {mb:g} MiB x {iters} ({backend})", flush=True)
    for r in results:
        verdict = f"FAIL: {r.problem}" if r.problem else "ok"
        print(
            f"[llmjp]   {r.kind:<5} {r.name:<20} ranks {ranks_text(r.ranks):<14} "
            f"busbw {r.busbw_gbps:9.3f} GB/s  algbw {r.algbw_gbps:9.3f} GB/s  "
            f"{r.seconds * 1e3:8.2f} ms  {verdict}",
            flush=True,
        )
