"""Fault-handling pieces that need no process group: injection specs, loss-spike detection,
and recognising a failed collective."""

from __future__ import annotations

import pytest

from megatron_llmjp.config.schema import FaultConfig
from megatron_llmjp.training.faults import (
    FaultMonitor,
    Injection,
    is_comm_failure,
    parse_injections,
)


def test_injection_specs_parse_with_and_without_rank():
    assert parse_injections("nan_loss@3:1, crash@5") == [
        Injection("nan_loss", 3, 1),
        Injection("crash", 5, None),
    ]
    assert parse_injections("") == [] and parse_injections(None) == []
    inj = Injection("hang", 2, None)
    assert inj.hits("hang", 2, 7) and not inj.hits("hang", 3, 7) and not inj.hits("crash", 2, 7)
    assert not Injection("crash", 2, 1).hits("crash", 2, 0)


@pytest.mark.parametrize("bad", ["nan@3", "crash", "crash@x", "crash@3:y"])
def test_bad_injection_spec_names_the_item(bad):
    with pytest.raises(ValueError, match=rf"LLMJP_FAULT: cannot parse '{bad}'"):
        parse_injections(bad)


def test_loss_spike_needs_a_full_window_and_the_factor():
    mon = FaultMonitor.create(
        FaultConfig(loss_spike_factor=1.5, loss_spike_window=3), rank=0, world=1
    )
    assert not mon.observe_loss(1, 100.0)  # window not full yet: no verdict
    for step, loss in enumerate([4.0, 4.0, 4.0], start=2):
        assert not mon.observe_loss(step, loss)
    assert not mon.observe_loss(5, 5.9)  # 5.9 < 1.5 x mean(4.0, 4.0, 4.0) = 6.0
    assert mon.observe_loss(6, 9.0)  # > 1.5 x mean(4.0, 4.0, 5.9)
    assert mon.loss_spikes == 1


def test_loss_spike_detection_is_off_by_default():
    mon = FaultMonitor.create(FaultConfig(loss_spike_window=1), rank=0, world=1)
    mon.observe_loss(1, 1.0)
    assert not mon.observe_loss(2, 1e6) and mon.loss_spikes == 0


def test_collective_failures_are_recognised():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [1.2.3.4]")
    assert is_comm_failure(gloo)
    assert is_comm_failure(RuntimeError("Timed out waiting 15000ms for recv operation"))
    assert not is_comm_failure(RuntimeError("shape mismatch in linear_fc1"))
    assert not is_comm_failure(ValueError("gloo"))
