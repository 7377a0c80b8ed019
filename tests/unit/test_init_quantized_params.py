"""Layout-independent initialisation of quantized (FP8) parameters, on CPU.

Transformer Engine's FP8 weights (``precision.fp8_param_gather``) are wrapper tensors: no
storage of their own, one scale per tensor, written by quantising a high-precision tensor. A
stand-in with the same properties (its storage cannot be read, every write is one
``quantize_`` with a per-tensor scale taken from that write alone, slices are refused) must end
up holding exactly what the plain parameters of an identical module get, through
megatron-core's real sharded-tensor factory for the SwiGLU ``linear_fc1``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_llmjp.models import init


class FakeQuantized(torch.Tensor):
    """Per-tensor scaled storage: ``payload * scale`` is the value; one scale per tensor."""

    @staticmethod
    def __new__(cls, shape, dtype=torch.float32):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, requires_grad=False)
        t.payload = torch.full(shape, float("nan"))
        t.scale = torch.ones(())
        t.quantize_calls = [0]
        t.initial = torch.full(shape, float("nan"))  # TE keeps it on the CPU
        return t

    def quantize_(self, src: torch.Tensor) -> None:
        self.quantize_calls[0] += 1
        self.scale = src.abs().max().clamp_min(1e-12)
        self.payload.copy_(src / self.scale)

    def dequantize(self) -> torch.Tensor:
        return self.payload * self.scale

    def get_high_precision_init_val(self) -> torch.Tensor:
        return self.initial

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            src = args[0]
            out = FakeQuantized(src.shape, src.dtype)
            out.payload, out.quantize_calls, out.initial = (
                src.payload,
                src.quantize_calls,
                src.initial,
            )
            return out
        if func is torch.ops.aten.copy_.default and isinstance(args[0], FakeQuantized):
            args[0].quantize_(args[1])
            return args[0]
        raise NotImplementedError(f"{func} on a quantized tensor")


class Layer(torch.nn.Module):
    """A norm, a QKV and a SwiGLU fc1/fc2 pair, with megatron-core's sharded state dict."""

    def __init__(self, quantized: bool):
        super().__init__()

        def weight(*shape):
            t = FakeQuantized(shape) if quantized else torch.full(shape, float("nan"))
            return torch.nn.Parameter(t)

        self.norm = torch.nn.Module()
        self.norm.weight = torch.nn.Parameter(torch.full((8,), float("nan")))
        self.linear_qkv = torch.nn.Module()
        self.linear_qkv.weight = torch.nn.Parameter(torch.full((24, 8), float("nan")))
        self.linear_fc1 = torch.nn.Module()
        self.linear_fc1.weight = weight(2 * 6, 8)
        self.linear_fc2 = torch.nn.Module()
        self.linear_fc2.weight = weight(8, 6)

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out = {}
        for name, t in self.state_dict(keep_vars=True).items():
            sh = ShardedTensor.from_rank_offsets(f"decoder.layers.{name}", t, replica_id=0)
            out[name] = apply_swiglu_sharded_factory(sh, ()) if "fc1" in name else sh
        return out


@pytest.fixture
def fake_te(monkeypatch):
    monkeypatch.setattr(init, "_is_quantized", lambda t: isinstance(t, FakeQuantized))


def _values(t: torch.Tensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, FakeQuantized) else t.detach()


def test_quantized_parameters_get_the_plain_values(fake_te):
    plain, fp8 = Layer(quantized=False), Layer(quantized=True)
    for m in (plain, fp8):
        init.initialize_weights([m], seed=7, std=0.02, num_layers=4)
    for name, p in plain.named_parameters():
        q = dict(fp8.named_parameters())[name]
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(_values(q), p.detach(), rtol=1e-6, atol=0), name
    for name in ("linear_fc1.weight", "linear_fc2.weight"):
        q = dict(fp8.named_parameters())[name]
        # One write of the whole tensor: one scale, equal to the tensor's amax.
        assert q.quantize_calls[0] == 1, name
        assert q.scale == dict(plain.named_parameters())[name].abs().max()
        # megatron-core's distributed optimizer starts its FP32 master weights from here.
        torch.testing.assert_close(q.initial, dict(plain.named_parameters())[name].detach())
    # The two SwiGLU halves come from different streams (not one block copied twice).
    fc1 = plain.linear_fc1.weight.detach()
    assert not torch.equal(fc1[:6], fc1[6:])
    assert plain.norm.weight.eq(1).all()


def test_a_quantized_parameter_outside_the_state_dict_is_reported(fake_te):
    m = Layer(quantized=True)
    m.extra = torch.nn.Parameter(FakeQuantized((4, 4)))
    described = Layer.sharded_state_dict(m)
    m.sharded_state_dict = lambda: {k: v for k, v in described.items() if k != "extra"}
    with pytest.raises(RuntimeError, match="extra"):
        init.initialize_weights([m], seed=7, std=0.02, num_layers=4)
