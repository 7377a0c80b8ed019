"""The CPU compatibility layer (installed by tests/conftest.py on machines without CUDA)."""

from __future__ import annotations

import pytest
import torch

from megatron_llmjp.parallel import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


def test_cuda_device_arguments_land_on_cpu():
    assert cpu_compat.is_active()
    for dev in ("cuda", "cuda:0", torch.device("cuda"), 0, torch.cuda.current_device()):
        assert torch.empty(2, device=dev).device.type == "cpu"
    x = torch.ones(3)
    assert x.cuda() is x
    assert x.to("cuda").device.type == "cpu"
    assert torch.zeros(2, pin_memory=True).device.type == "cpu"


def test_tensor_types_report_cuda_for_megatron_dispatch():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # conversion untouched


def test_cuda_rng_is_the_cpu_generator():
    state = torch.cuda.get_rng_state()
    a = torch.randn(4)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.randn(4), a)
    torch.cuda.manual_seed(7)
    b = torch.randn(4)
    torch.manual_seed(7)
    assert torch.equal(torch.randn(4), b)


def test_backward_runs_inside_the_mode():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(torch.empty(1, device="cuda").device.type)
            return g * 2

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == ["cpu"]
    assert torch.equal(x.grad, torch.full((2,), 2.0))


def test_backward_arguments_are_honoured():
    x = torch.ones(2, requires_grad=True)
    y = x * 3
    y.backward(torch.tensor([1.0, 2.0]), retain_graph=True)
    torch.autograd.backward(y, grad_tensors=torch.ones(2))
    assert torch.equal(x.grad, torch.tensor([6.0, 9.0]))
