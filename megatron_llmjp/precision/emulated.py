"""Emulated FP8 GEMMs for megatron-core's local linear layers (``precision.fp8_backend=emulated``).

**Slow, and for numerics only**: every quantisation is a handful of element-wise torch ops and
the GEMMs run in FP32. Use it to study FP8 recipes at small scale (on CPU or GPU) and to test
the ablation harness; never for throughput, and never as evidence of TE kernel behaviour
beyond the rounding and scaling logic reproduced here.

What is emulated, per linear layer of attention and MLP (experts included):

* forward ``y = Q(x) Q(W)^T`` with the forward format (e4m3); backward
  ``dx = Q(g) Q(W)`` and ``dW = Q(g)^T Q(x)`` with ``g`` in the backward format (e5m2 for
  ``hybrid``). ``fp8_wgrad=False`` computes ``dW = g^T x`` from the unquantised tensors.
* ``Q`` quantises to ``torch.float8_e4m3fn`` / ``torch.float8_e5m2`` (saturating at the
  format's maximum) and dequantises to FP32; the GEMM accumulates in FP32 like a tensor-core
  FP8 GEMM, and its output is cast to the input dtype (BF16).
* Scales, as Transformer Engine computes them:

  - ``delayed``: one scale per tensor, ``fp8_max / amax / 2**margin``, where amax is the newest
    entry (``most_recent``) or the maximum of the amax history. A tensor is quantised with the
    current scale, then its amax is pushed into the history and, every ``fp8_interval`` uses,
    the scale is recomputed (so step n uses amaxes up to step n-1). One use is one training
    forward (x, W) or backward (g) of the layer, i.e. one microbatch; evaluation uses the
    scales without updating them. The history starts at zero and the scale at 1.
  - ``tensorwise``: one scale per tensor from its current amax.
  - ``blockwise``: power-of-two scales per 1x128 block of activations and gradients and per
    128x128 block of weights (TE's ``Float8BlockScaling`` defaults, as in DeepSeek-V3).
  - ``mxfp8``: power-of-two (E8M0) scales per 32 consecutive elements.

  Blocks run along each GEMM's contraction dimension, so the backward GEMMs use separately
  quantised (transposed-block) copies, as TE does.
* Per-tensor amaxes are reduced (MAX) over the layer's tensor-parallel group, so every TP
  rank uses the same scale. TE also reduces them over data parallelism; here each DP rank
  keeps its own activation/gradient history and checkpoints store DP rank 0's.
* The layers with global index < ``bf16_first_layers`` or >= ``num_layers - bf16_last_layers``
  run unquantised. The delayed-scaling state is a plain attribute (not a parameter or buffer,
  so BF16 casts leave it in FP32) and is checkpointed as the layers' ``_extra_state``.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_llmjp.precision.recipes import EmulatedFP8

PER_TENSOR = ("delayed", "tensorwise")


def fp8_max(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def quantize(t: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``t * scale`` cast to the FP8 ``dtype`` (saturating) and back, divided by ``scale``;
    FP32."""
    m = fp8_max(dtype)
    return (t.float() * scale).clamp(-m, m).to(dtype).float() / scale


def scale_from_amax(
    amax: torch.Tensor, dtype: torch.dtype, margin: int = 0, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """``fp8_max / amax / 2**margin``; keeps ``previous`` (default 1) where amax is 0 or not
    finite, as TE does."""
    amax = amax.float()
    keep = torch.ones_like(amax) if previous is None else previous
    scale = fp8_max(dtype) / amax / 2.0**margin
    return torch.where((amax > 0) & torch.isfinite(amax), scale, keep)


def quantize_blocks(t: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Quantise a 2-D tensor with one power-of-two scale per ``block`` (rows x columns); edge
    blocks are partial. The scale is the largest power of two with ``amax * scale <=
    fp8_max`` (E8M0 for MXFP8, TE's power-of-two FP32 scales for blockwise)."""
    rows, cols = t.shape
    if not t.numel():  # an expert that received no tokens
        return t.float()
    br, bc = min(block[0], rows), min(block[1], cols)
    pr, pc = -rows % br, -cols % bc
    padded = torch.nn.functional.pad(t.float(), (0, pc, 0, pr))
    tiles = padded.reshape((rows + pr) // br, br, (cols + pc) // bc, bc)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    exponent = torch.floor(torch.log2(fp8_max(dtype) / amax)).clamp(-127, 127)
    scale = torch.where(amax > 0, torch.exp2(exponent), torch.ones_like(amax))
    return quantize(tiles, scale, dtype).reshape(padded.shape)[:rows, :cols]


def _amax(t: torch.Tensor, group) -> torch.Tensor:
    amax = t.detach().abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float)
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
    return amax


class Scaling:
    """Quantiser of one GEMM operand (``x``, ``w`` or ``g``) of one layer, with its delayed-
    scaling state (amax history, scale, uses)."""

    def __init__(self, fp8: EmulatedFP8, role: str):
        self.fp8, self.role = fp8, role
        self.dtype = fp8.backward_dtype if role == "g" else fp8.forward_dtype
        self.amax_history: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.uses = 0

    def __call__(
        self, t: torch.Tensor, group=None, *, columnwise: bool = False, update: bool = True
    ) -> torch.Tensor:
        """``t`` (2-D) quantised and dequantised in FP32. Blocks run along its last dimension,
        or along the first with ``columnwise``; ``update=False`` leaves the history alone."""
        recipe = self.fp8.recipe
        if recipe == "delayed":
            return self._delayed(t, group, update)
        if recipe == "tensorwise":
            return quantize(t, scale_from_amax(_amax(t, group), self.dtype), self.dtype)
        block = (1, 32) if recipe == "mxfp8" else (128, 128) if self.role == "w" else (1, 128)
        if columnwise:
            return quantize_blocks(t.t(), block, self.dtype).t()
        return quantize_blocks(t, block, self.dtype)

    def _delayed(self, t: torch.Tensor, group, update: bool) -> torch.Tensor:
        if self.amax_history is None:
            self.amax_history = torch.zeros(self.fp8.history_len, device=t.device)
            self.scale = torch.ones((), device=t.device)
        elif self.amax_history.device != t.device:
            self.amax_history, self.scale = self.amax_history.to(t.device), self.scale.to(t.device)
        out = quantize(t, self.scale, self.dtype)
        if update:
            self.push(_amax(t, group))
        return out

    def push(self, amax: torch.Tensor) -> None:
        """Record a used tensor's amax; every ``interval`` uses, recompute the scale."""
        self.amax_history = torch.roll(self.amax_history, 1)
        self.amax_history[0] = amax
        self.uses += 1
        if self.uses % self.fp8.interval == 0:
            a = self.amax_history[0]
            if self.fp8.compute_algo == "max":
                a = self.amax_history.max()
            self.scale = scale_from_amax(a, self.dtype, self.fp8.margin, self.scale)

    def state(self) -> dict | None:
        if self.amax_history is None:
            return None
        history, scale = self.amax_history.cpu(), self.scale.cpu()
        return {"amax_history": history, "scale": scale, "uses": self.uses}

    def load(self, state: dict | None) -> None:
        if state is not None:
            self.amax_history = state["amax_history"].float().clone()
            self.scale = state["scale"].float().clone()
            self.uses = int(state["uses"])


class _FP8Gemm(torch.autograd.Function):
    """``x @ W^T`` with quantised operands; see the module docstring for what is quantised."""

    @staticmethod
    def forward(ctx, x, weight, layer: _EmulatedLinear, group):
        x2 = x.reshape(-1, x.shape[-1])
        update = layer.training and torch.is_grad_enabled()
        qx = layer.q_x(x2, group, update=update)
        qw = layer.q_w(weight, group, update=update)
        ctx.save_for_backward(x2, weight, qx, qw)
        ctx.layer, ctx.group, ctx.x_shape, ctx.x_dtype = layer, group, x.shape, x.dtype
        return (qx @ qw.t()).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, qx, qw = ctx.saved_tensors
        layer, group = ctx.layer, ctx.group
        per_tensor = layer.fp8.recipe in PER_TENSOR
        g2 = grad.reshape(-1, grad.shape[-1])
        qg = layer.q_g(g2, group)
        # The dgrad GEMM contracts over W's rows: 1-D blocks must run down its columns
        # (128x128 tiles and per-tensor scales serve both directions).
        if per_tensor or layer.fp8.recipe == "blockwise":
            qw_d = qw
        else:
            qw_d = layer.q_w(weight, columnwise=True, update=False)
        dx = (qg @ qw_d).to(ctx.x_dtype).reshape(ctx.x_shape)
        dw = None
        if ctx.needs_input_grad[1]:
            if not layer.fp8.wgrad:
                dw = g2.float().t() @ x2.float()
            elif per_tensor:
                dw = qg.t() @ qx
            else:  # the wgrad GEMM contracts over tokens: blocks along them
                dw = layer.q_g(g2, columnwise=True).t() @ layer.q_x(x2, columnwise=True)
            dw = dw.to(weight.dtype)
        return dx, dw, None, None


class _EmulatedLinear:
    """Mixin over megatron's local linear layers: the GEMM (``_forward_impl``) is emulated FP8,
    everything else (sharding, bias, reductions after the GEMM) is the base class's."""

    def _init_fp8(self, fp8: EmulatedFP8) -> None:
        self.fp8 = fp8
        self.fp8_enabled = True  # EmulatedFP8TransformerLayer turns BF16 layers off
        self.q_x, self.q_w, self.q_g = (Scaling(fp8, r) for r in ("x", "w", "g"))

    def _forward_impl(
        self,
        input,
        weight,
        bias,
        gradient_accumulation_fusion,
        allreduce_dgrad,
        sequence_parallel,
        grad_output_buffer=None,
        wgrad_deferral_limit=None,
        tp_group=None,
        **kwargs,
    ):
        if not self.fp8_enabled:
            return super()._forward_impl(
                input=input,
                weight=weight,
                bias=bias,
                gradient_accumulation_fusion=gradient_accumulation_fusion,
                allreduce_dgrad=allreduce_dgrad,
                sequence_parallel=sequence_parallel,
                grad_output_buffer=grad_output_buffer,
                wgrad_deferral_limit=wgrad_deferral_limit,
                tp_group=tp_group,
                **kwargs,
            )
        group = tp_group if tp_group is not None else self.tp_group
        # The communication megatron's fused linear function does around its GEMM.
        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, True, group=group)
        elif allreduce_dgrad:
            input = copy_to_tensor_model_parallel_region(input, group=group)
        out = _FP8Gemm.apply(input, weight, self, group)
        return out + bias if bias is not None else out

    def get_extra_state(self) -> dict | None:
        states = {r: q.state() for r, q in (("x", self.q_x), ("w", self.q_w), ("g", self.q_g))}
        return None if all(s is None for s in states.values()) else states

    def set_extra_state(self, state) -> None:
        if isinstance(state, dict):
            for role, q in (("x", self.q_x), ("w", self.q_w), ("g", self.q_g)):
                q.load(state.get(role))


class EmulatedColumnParallelLinear(_EmulatedLinear, ColumnParallelLinear):
    def __init__(self, *args, fp8: EmulatedFP8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(fp8)


class EmulatedRowParallelLinear(_EmulatedLinear, RowParallelLinear):
    def __init__(self, *args, fp8: EmulatedFP8, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(fp8)


class EmulatedFP8TransformerLayer(TransformerLayer):
    """A TransformerLayer that switches its emulated linears off when its global layer index
    is one of the BF16 first/last layers (megatron's ``layer_number`` is global, 1-based)."""

    def __init__(self, *args, fp8: EmulatedFP8, **kwargs):
        super().__init__(*args, **kwargs)
        on = fp8.layer_in_fp8(self.layer_number - 1)
        for m in self.modules():
            if isinstance(m, _EmulatedLinear):
                m.fp8_enabled = on


def emulated_layer_spec(spec: ModuleSpec, fp8: EmulatedFP8) -> ModuleSpec:
    """A copy of the local layer ``spec`` whose Column/RowParallelLinear layers (attention,
    MLP, experts) are the emulated-FP8 ones."""
    swap = {
        ColumnParallelLinear: EmulatedColumnParallelLinear,
        RowParallelLinear: EmulatedRowParallelLinear,
    }

    def visit(node) -> None:
        sub = getattr(node, "submodules", None)
        if not dataclasses.is_dataclass(sub):
            return
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, type) and value in swap:
                setattr(sub, f.name, ModuleSpec(module=swap[value], params={"fp8": fp8}))
            elif isinstance(value, ModuleSpec):
                visit(value)

    spec = copy.deepcopy(spec)
    visit(spec)
    spec.module = EmulatedFP8TransformerLayer
    spec.params = {**spec.params, "fp8": fp8}
    return spec
