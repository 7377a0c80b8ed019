"""Layout-independent weight initialisation.

megatron-core draws each rank's shard from a rank-dependent RNG stream, so the same seed gives
different models under TP1 and TP2. Here every parameter is filled from the model's
``sharded_state_dict``: each global tensor (identified by its checkpoint key and its layer /
expert index) is generated in fixed row blocks from a seed derived from those names, and a
rank copies the slice it owns. The same seed therefore gives the same model under every
TP/PP/VPP/EP/ETP/DP layout, which makes layout ablations and the parity tests meaningful,
and memory stays at one row block per tensor.
"""

from __future__ import annotations

import hashlib
import math

import torch

_BLOCK_ROWS = 4096
_ONES_SUFFIXES = ("layer_norm_weight", "layernorm.weight", "norm.weight")
_SCALED_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _block_seed(seed: int, key: str, index: tuple[int, ...], block: int) -> int:
    text = f"{seed}|{key}|{','.join(map(str, index))}|{block}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _std_for(key: str, std: float, num_layers: int) -> float:
    if key.endswith(_SCALED_SUFFIXES):
        # Megatron's scaled init for the residual-branch output projections.
        return std / math.sqrt(2.0 * num_layers)
    return std


@torch.no_grad()
def _fill_shard(sh, seed: int, std: float, num_layers: int) -> None:
    data = sh.data
    key = sh.key
    if key.endswith(_ONES_SUFFIXES):
        data.fill_(1.0)
        return
    if key.endswith(".bias"):
        data.zero_()
        return
    if data.dim() < 2:
        raise RuntimeError(f"no initialisation rule for 1-D parameter {key!r}")
    pre = sh.prepend_axis_num
    index = tuple(sh.global_offset[:pre])
    global_rows = sh.global_shape[pre]
    row0, n_rows = sh.global_offset[pre], data.shape[0]
    col_slices = [
        slice(off, off + n)
        for off, n in zip(sh.global_offset[pre + 1 :], data.shape[1:], strict=True)
    ]
    full_tail = tuple(sh.global_shape[pre + 1 :])
    sigma = _std_for(key, std, num_layers)
    gen = torch.Generator(device=data.device)
    first, last = row0 // _BLOCK_ROWS, (row0 + n_rows - 1) // _BLOCK_ROWS
    for block in range(first, last + 1):
        b0 = block * _BLOCK_ROWS
        rows = min(_BLOCK_ROWS, global_rows - b0)
        gen.manual_seed(_block_seed(seed, key, index, block))
        values = torch.randn((rows, *full_tail), generator=gen, device=data.device)
        lo, hi = max(row0, b0), min(row0 + n_rows, b0 + rows)
        piece = values[(slice(lo - b0, hi - b0), *col_slices)]
        data[lo - row0 : hi - row0].copy_(piece * sigma)


def _is_quantized(t: torch.Tensor) -> bool:
    """True for a Transformer Engine quantized tensor (an FP8 weight built under TE's
    ``fp8_model_init``, i.e. ``precision.fp8_param_gather``): megatron-core's own test."""
    from megatron.core.fp8_utils import is_float8tensor

    return is_float8tensor(t)


def initialize_weights(
    chunks: list[torch.nn.Module], seed: int, std: float, num_layers: int
) -> None:
    """Fill every parameter of ``chunks`` from the layout-independent streams; fails if any
    parameter element is left untouched (a new module type would otherwise keep garbage).

    Plain parameters are matched to their shards by storage (a shard is the parameter or a view
    of it). A quantized (FP8) parameter is a wrapper tensor without a storage of its own, and
    writing a slice of it would quantise each slice with its own scale; its shards (the
    parameter itself, ``state_dict(keep_vars=True)``, or the pieces a ``ShardedTensorFactory``
    builds from it) are filled in a high-precision tensor of its shape, quantised once into the
    parameter, and copied into TE's high-precision initial value, from which megatron-core's
    distributed optimizer takes its FP32 master weights."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for chunk in chunks:
        params, quantized = {}, {}
        for n, p in chunk.named_parameters():
            if _is_quantized(p):
                quantized[("quantized", id(p))] = (n, p)  # never equal to a pointer
            else:
                params[p.untyped_storage().data_ptr()] = (n, p)
        covered = dict.fromkeys([*params, *quantized], 0)
        for item in nested_values(chunk.sharded_state_dict()):
            target = quantized.get(("quantized", id(getattr(item, "data", None))))
            if target is not None:  # one item holds all of a quantized parameter's shards
                p = target[1]
                staging = torch.empty(p.shape, dtype=p.dtype, device=p.device)
                item = replace(item, data=staging)
            shards = [item]
            if isinstance(item, ShardedTensorFactory):
                shards = list(nested_values(item.build()))
            for sh in shards:
                if not isinstance(sh, ShardedTensor) or sh.data is None:
                    continue
                if target is not None:
                    owner = ("quantized", id(target[1]))
                elif _is_quantized(sh.data):
                    continue  # a view of a quantized parameter: reported as uncovered below
                else:
                    owner = sh.data.untyped_storage().data_ptr()
                    if owner not in params:
                        continue  # a buffer, not a parameter
                _fill_shard(sh, seed, std, num_layers)
                covered[owner] += sh.data.numel()
            if target is not None:
                _quantize_into(target[1], staging)
        everything = {**params, **quantized}
        missing = [everything[k][0] for k, n in covered.items() if n < everything[k][1].numel()]
        if missing:
            raise RuntimeError(f"parameters without an initialisation rule: {missing}")


@torch.no_grad()
def _quantize_into(param: torch.Tensor, values: torch.Tensor) -> None:
    """Quantise ``values`` into the quantized ``param`` (TE: one scale for the whole tensor),
    and keep them as TE's high-precision initial value where ``fp8_model_init`` saved one."""
    param.copy_(values)
    get_init = getattr(param, "get_high_precision_init_val", None)
    initial = get_init() if get_init is not None else None
    if initial is not None:
        initial.copy_(values)
