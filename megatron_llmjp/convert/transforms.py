"""Named transforms between one megatron-core tensor and its Hugging Face tensors.

Each transform is a pair: ``split`` turns the megatron slice into the HF tensors (in the order
a mapping rule lists them) and ``merge`` is its exact inverse. Both only reshape, slice and
concatenate, so a round trip is bit-identical, and both work on ``meta`` tensors, which is how
the driver derives and checks every shape before reading or writing any data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_llmjp.config.loader import ConfigError


class ConversionError(ConfigError):
    """A conversion that cannot be done; the message names the file, key and expectation."""


class ParityError(ConversionError):
    """The converted model does not compute the same function as its source."""


@dataclass(frozen=True)
class Dims:
    """The sizes the transforms need, taken from the checkpoint manifest or HF config."""

    vocab_size: int
    padded_vocab_size: int
    num_query_groups: int
    heads_per_group: int
    head_dim: int


def _copy_split(t: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    return [t]


def _copy_merge(ts: list[torch.Tensor], d: Dims) -> torch.Tensor:
    return ts[0]


def _qkv_split(t: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """``linear_qkv`` rows come in num_query_groups blocks of [q heads of the group, k, v]."""
    g, h, n = d.num_query_groups, d.heads_per_group, d.head_dim
    if t.shape[0] != g * (h + 2) * n:
        raise ConversionError(
            f"fused QKV has {t.shape[0]} rows, expected num_query_groups*(heads_per_group+2)*"
            f"head_dim = {g}*({h}+2)*{n} = {g * (h + 2) * n}"
        )
    blocks = t.reshape(g, h + 2, n, *t.shape[1:])
    q = blocks[:, :h].reshape(g * h * n, *t.shape[1:])
    k = blocks[:, h].reshape(g * n, *t.shape[1:])
    v = blocks[:, h + 1].reshape(g * n, *t.shape[1:])
    return [q, k, v]


def _qkv_merge(ts: list[torch.Tensor], d: Dims) -> torch.Tensor:
    q, k, v = ts
    g, h, n = d.num_query_groups, d.heads_per_group, d.head_dim
    rest = q.shape[1:]
    blocks = torch.cat(
        [q.reshape(g, h, n, *rest), k.reshape(g, 1, n, *rest), v.reshape(g, 1, n, *rest)], dim=1
    )
    return blocks.reshape(g * (h + 2) * n, *rest)


def _gate_up_split(t: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """SwiGLU ``linear_fc1``: the gate rows, then the up rows."""
    if t.shape[0] % 2:
        raise ConversionError(f"fused gate/up weight has an odd number of rows ({t.shape[0]})")
    gate, up = t.chunk(2, dim=0)
    return [gate, up]


def _gate_up_merge(ts: list[torch.Tensor], d: Dims) -> torch.Tensor:
    return torch.cat(ts, dim=0)


def _vocab_split(t: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """Drop the rows megatron adds to make the vocabulary divisible by 128 * TP."""
    return [t[: d.vocab_size]]


def _vocab_merge(ts: list[torch.Tensor], d: Dims) -> torch.Tensor:
    (t,) = ts
    pad = d.padded_vocab_size - t.shape[0]
    if pad < 0:
        raise ConversionError(
            f"vocabulary of {t.shape[0]} rows is larger than the padded size {d.padded_vocab_size}"
        )
    return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t


Split = Callable[[torch.Tensor, Dims], list[torch.Tensor]]
Merge = Callable[[list[torch.Tensor], Dims], torch.Tensor]

TRANSFORMS: dict[str, tuple[Split, Merge]] = {
    "copy": (_copy_split, _copy_merge),
    "qkv": (_qkv_split, _qkv_merge),
    "gate_up": (_gate_up_split, _gate_up_merge),
    "vocab": (_vocab_split, _vocab_merge),
}

# Transforms whose HF tensor is the first rows of the megatron one (the remaining rows, the
# vocabulary padding, are zeros): big tensors of these can move in blocks of rows.
ROW_PREFIX = frozenset({"copy", "vocab"})
