"""Fault handling: exit signals, non-finite steps, loss spikes, lost peers, and fault injection.

Every rank contributes its local observations (non-finite loss, non-finite gradients, a
received exit signal) to one small all-reduce per step, so all ranks take the same decision on
the same step and a report can name the ranks that saw the problem.

``LLMJP_FAULT`` injects faults for tests and drills: a comma-separated list of
``KIND@STEP[:RANK]`` (steps count from 1 as logged; no rank means every rank), with KIND one of
``nan_loss``, ``nan_grad``, ``crash`` (the process exits with code 17 at the start of the step),
``hang`` (sleeps forever at the start of the step) and ``stall_save`` (rank 0 sleeps forever
after the save of that iteration is written and before it is published).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from megatron_llmjp.config.schema import FaultConfig

FAULT_ENV = "LLMJP_FAULT"
_KINDS = ("nan_loss", "nan_grad", "crash", "hang", "stall_save")


@dataclass(frozen=True)
class Injection:
    kind: str
    step: int
    rank: int | None

    def hits(self, kind: str, step: int, rank: int) -> bool:
        return self.kind == kind and self.step == step and self.rank in (None, rank)


def parse_injections(text: str | None) -> list[Injection]:
    out = []
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        try:
            kind, _, where = item.partition("@")
            step, _, rank = where.partition(":")
            inj = Injection(kind, int(step), int(rank) if rank else None)
        except ValueError:
            inj = None
        if inj is None or inj.kind not in _KINDS:
            raise ValueError(
                f"{FAULT_ENV}: cannot parse {item!r}; expected KIND@STEP[:RANK] with KIND in "
                f"{', '.join(_KINDS)}"
            )
        out.append(inj)
    return out


class NonFiniteError(RuntimeError):
    """A step produced a NaN/Inf loss or gradient and the policy is ``stop``."""

    def __init__(self, report: str):
        super().__init__(report)
        self.report = report


class PeerFailure(RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""


@dataclass
class StepVerdict:
    apply_update: bool
    stop_for_signal: bool
    loss_ranks: list[int]
    grad_ranks: list[int]

    @property
    def nonfinite(self) -> bool:
        return bool(self.loss_ranks or self.grad_ranks)


def _ranks(flags: torch.Tensor) -> list[int]:
    return [int(i) for i in torch.nonzero(flags).flatten().tolist()]


@dataclass
class FaultMonitor:
    """Per-process fault state; one instance per run."""

    cfg: FaultConfig
    rank: int
    world: int
    injections: list[Injection] = field(default_factory=list)
    skipped_steps: int = 0
    loss_spikes: int = 0
    _signal: str | None = None
    _recent: deque = field(init=False)
    _previous: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.cfg.loss_spike_window)

    @classmethod
    def create(cls, cfg: FaultConfig, rank: int, world: int) -> FaultMonitor:
        return cls(cfg, rank, world, parse_injections(os.environ.get(FAULT_ENV)))

    # -- signals ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for name in self.cfg.exit_signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        self._signal = signal.Signals(signum).name
        print(
            f"[llmjp] rank {self.rank}: received {self._signal}; saving and exiting after the "
            "current step",
            file=sys.stderr,
            flush=True,
        )

    @property
    def signal_name(self) -> str | None:
        return self._signal

    # -- injection -------------------------------------------------------------------------
    def injected(self, kind: str, step: int) -> bool:
        return any(i.hits(kind, step, self.rank) for i in self.injections)

    def at_step_start(self, step: int) -> None:
        if self.injected("crash", step):
            print(f"[llmjp] rank {self.rank}: injected crash at step {step}", flush=True)
            os._exit(17)
        if self.injected("hang", step):
            print(f"[llmjp] rank {self.rank}: injected hang at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def before_publish(self, iteration: int) -> None:
        if self.injected("stall_save", iteration):
            print(f"[llmjp] injected stall before publishing iteration {iteration}", flush=True)
            while True:
                time.sleep(3600)

    # -- the per-step decision -------------------------------------------------------------
    def decide(self, step: int, loss_bad: bool, grad_bad: bool, device) -> StepVerdict:
        """All-reduce this rank's observations and apply the policy (collective: all ranks)."""
        flags = torch.zeros(2 * self.world + 1, dtype=torch.int32, device=device)
        flags[self.rank] = int(loss_bad)
        flags[self.world + self.rank] = int(grad_bad)
        flags[-1] = int(self._signal is not None)
        torch.distributed.all_reduce(flags)
        flags = flags.cpu()
        verdict = StepVerdict(
            apply_update=True,
            stop_for_signal=bool(flags[-1]),
            loss_ranks=_ranks(flags[: self.world]),
            grad_ranks=_ranks(flags[self.world : 2 * self.world]),
        )
        if not verdict.nonfinite:
            return verdict
        what = []
        if verdict.loss_ranks:
            what.append(f"non-finite loss on ranks {verdict.loss_ranks}")
        if verdict.grad_ranks:
            what.append(f"non-finite gradients on ranks {verdict.grad_ranks}")
        report = f"step {step}: " + "; ".join(what)
        self.skipped_steps += self.cfg.nonfinite == "skip"
        if self.cfg.nonfinite == "stop" or self.skipped_steps > self.cfg.max_skipped_steps:
            reason = (
                "fault.nonfinite=stop"
                if self.cfg.nonfinite == "stop"
                else f"more than fault.max_skipped_steps={self.cfg.max_skipped_steps} skipped"
            )
            raise NonFiniteError(
                f"{report}. Stopping ({reason}); this step's update was not applied, so the "
                "weights and the last checkpoint are intact."
            )
        if self.rank == self.world - 1:
            print(
                f"[llmjp] {report}: update skipped ({self.skipped_steps} skipped so far)",
                flush=True,
            )
        verdict.apply_update = False
        return verdict

    def observe_loss(self, step: int, loss: float) -> bool:
        """Track the loss (logging rank); True when it is a spike against the recent mean."""
        spike = False
        factor = self.cfg.loss_spike_factor
        if factor and len(self._recent) == self._recent.maxlen:
            mean = sum(self._recent) / len(self._recent)
            if loss > factor * mean:
                spike = True
                self.loss_spikes += 1
                print(
                    f"[llmjp] loss spike at step {step}: {loss:.4f} > {factor} x recent mean "
                    f"{mean:.4f} ({self.loss_spikes} so far)",
                    flush=True,
                )
        if loss == loss:  # not NaN
            self._recent.append(loss)
        return spike


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed or timed-out collective (gloo or NCCL)."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text
        for s in (
            "gloo",
            "nccl",
            "connection closed by peer",
            "connection reset",
            "timed out",
            "timeout",
            "broken pipe",
        )
    )


def local_grads_nonfinite(model: list) -> bool:
    """Any NaN/Inf in this rank's gradient buffers (megatron DDP keeps all grads there).

    One sum per buffer: a NaN or Inf anywhere makes the sum non-finite, and unlike
    ``isfinite(x).all()`` it allocates no buffer-sized mask (a single read of the gradients,
    a few milliseconds per step for an 8B model on one GPU)."""
    sums = [
        buf.grad_data.sum(dtype=torch.float32)
        for chunk in model
        for buf in (*chunk.buffers, *chunk.expert_parallel_buffers)
        if buf.grad_data.numel()
    ]
    return bool(sums) and not bool(torch.isfinite(torch.stack(sums)).all())


def poison_grads(model: list) -> None:
    """Fault injection: put a NaN into the first gradient buffer."""
    for chunk in model:
        for buf in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            if buf.grad_data.numel():
                buf.grad_data.view(-1)[0] = float("nan")
                return
