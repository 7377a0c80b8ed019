"""The conversion's checkpoint I/O: batched, threaded ``TensorWriter`` writes that megatron-core
and torch's own distributed-checkpoint loader read back bit-identically, one flush per file at
the end only, and the driver's row-split shortcut agreeing with the transforms it replaces."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_llmjp.checkpoint import tensors
from megatron_llmjp.checkpoint.tensors import TensorReader, TensorWriter
from megatron_llmjp.convert import driver, mappings
from megatron_llmjp.convert.transforms import TRANSFORMS
from tests.helpers.spawn import spawn

L, R, C = 3, 8, 6  # layers, rows (gate 4 + up 4), columns


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "decoder.layers.mlp.linear_fc1.weight": torch.randn(L, R, C, generator=gen).to(
            torch.bfloat16
        ),
        "embedding.word_embeddings.weight": torch.randn(10, C, generator=gen),
    }


def _write(directory, threads: int = 2) -> dict[str, torch.Tensor]:
    """Layer 0 whole, layers 1-2 as [gate; up] row chunks (two files per call), the embedding
    in two row blocks of separate calls."""
    w = _weights()
    fc1, emb = w["decoder.layers.mlp.linear_fc1.weight"], w["embedding.word_embeddings.weight"]
    writer = TensorWriter(directory, threads=threads)
    for key, t in w.items():
        writer.declare(key, t.shape, t.dtype)
    writer.write([("decoder.layers.mlp.linear_fc1.weight", (0,), fc1[0])])
    for layer in (2, 1):
        writer.write(
            [
                ("decoder.layers.mlp.linear_fc1.weight", (layer,), fc1[layer, :4], 0),
                ("decoder.layers.mlp.linear_fc1.weight", (layer,), fc1[layer, 4:], 4),
            ]
        )
    writer.write([("embedding.word_embeddings.weight", (), emb[:7], 0)])
    writer.write([("embedding.word_embeddings.weight", (), emb[7:], 7)])
    writer.finish({"iteration": 0})
    return w


def test_writes_use_one_file_per_thread_and_flush_once_at_the_end(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    crc_before = torch.serialization.get_crc32_options()
    w = _weights()
    writer = TensorWriter(tmp_path / "ckpt", threads=2)
    for key, t in w.items():
        writer.declare(key, t.shape, t.dtype)
    fc1 = w["decoder.layers.mlp.linear_fc1.weight"]
    writer.write([("decoder.layers.mlp.linear_fc1.weight", (i,), fc1[i]) for i in range(L)])
    writer.write([("embedding.word_embeddings.weight", (), w["embedding.word_embeddings.weight"])])
    assert synced == []  # nothing flushed while writing
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.distcp"))
    # Call 0 (three slices) on two threads: two files; call 1 (one slice): one file.
    assert files == ["__0_0.distcp", "__0_1.distcp", "__1_0.distcp"]
    writer.finish()
    on_disk = sorted(str(p) for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert sorted(s for s in synced if s != str(tmp_path / "ckpt")) == on_disk
    assert synced.count(str(tmp_path / "ckpt")) == 1  # the folder, once, last
    assert synced[-1] == str(tmp_path / "ckpt")
    assert torch.serialization.get_crc32_options() == crc_before


def test_torch_dcp_loads_the_batched_writes_bit_identically(tmp_path):
    import torch.distributed.checkpoint as dcp

    w = _write(tmp_path / "ckpt")
    assert (
        len(list((tmp_path / "ckpt").glob("*.distcp"))) == 7
    )  # files of the calls: 1 + 2 + 2 + 1 + 1
    out = {k: torch.zeros_like(t) for k, t in w.items()}
    dcp.load(out, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    for k, t in w.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k
    r = TensorReader(tmp_path / "ckpt")
    fc1 = w["decoder.layers.mlp.linear_fc1.weight"]
    assert torch.equal(r.read("decoder.layers.mlp.linear_fc1.weight", (1,)), fc1[1])
    assert torch.equal(r.read("decoder.layers.mlp.linear_fc1.weight", (0,), (4, 8)), fc1[0, 4:])
    assert r.common() == {"iteration": 0}
    assert r.check_files() == 8  # + .metadata


def _megatron_load(directory) -> list[tuple[int, int, torch.Tensor]]:
    """On each of 2 gloo ranks, megatron-core's dist_checkpointing loads every layer of fc1
    split by columns (a layout the writer never used) and the embedding split by rows."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sd = {
        f"fc1.{layer}": ShardedTensor.from_rank_offsets(
            "decoder.layers.mlp.linear_fc1.weight",
            torch.zeros(R, C // 2, dtype=torch.bfloat16),
            (0, layer, L),
            (2, rank, 2),
            replica_id=0,
            prepend_axis_num=1,
        )
        for layer in range(L)
    }
    sd["emb"] = ShardedTensor.from_rank_offsets(
        "embedding.word_embeddings.weight", torch.zeros(5, C), (0, rank, 2), replica_id=0
    )
    loaded = dist_checkpointing.load(sd, str(directory))
    dist.destroy_process_group()
    # Plain lists cross the process boundary (bf16 -> float32 is exact).
    out = [(rank, layer, loaded[f"fc1.{layer}"]) for layer in range(L)]
    out.append((rank, -1, loaded["emb"]))
    return [(r, layer, str(t.dtype), t.float().tolist()) for r, layer, t in out]


@pytest.mark.slow
@pytest.mark.distributed
def test_megatron_core_loads_the_batched_writes_in_another_layout(tmp_path):
    w = _write(tmp_path / "ckpt")
    fc1, emb = w["decoder.layers.mlp.linear_fc1.weight"], w["embedding.word_embeddings.weight"]
    results = spawn(_megatron_load, 2, tmp_path / "ckpt", timeout=300)
    for per_rank in results:
        for rank, layer, dtype, values in per_rank:
            if layer < 0:
                expected = emb[rank * 5 : rank * 5 + 5]
            else:
                expected = fc1[layer, :, rank * (C // 2) : (rank + 1) * (C // 2)]
            assert dtype == str(expected.dtype) and values == expected.float().tolist(), (
                rank,
                layer,
            )


@pytest.mark.parametrize("name", ["llm-jp-4-tiny-dense", "llm-jp-4-tiny-moe"])
def test_row_splits_are_what_the_transforms_compute(name, monkeypatch):
    """Where the driver moves HF tensors as rows of the slice, the transform's split of real
    data is exactly those rows, in order, and its merge is their concatenation; the fused QKV
    (interleaved per group) is not moved that way, SwiGLU fc1 is, and a changed transform
    changes the rows (the shortcut follows ``TRANSFORMS``)."""
    from megatron_llmjp.checkpoint.manifest import model_section
    from megatron_llmjp.models.registry import get_model

    model = model_section(get_model(name), 1, "sequential")
    dims = mappings.dims_of(model)
    found = {}
    for r in mappings.rules_for(model):
        ranges = driver._row_ranges(r, model)
        found[r.transform] = found.get(r.transform, False) or ranges is not None
        if ranges is None:
            continue
        shape = driver._slice_shape(r, model)
        t = torch.randn(shape)
        split, merge = TRANSFORMS[r.transform]
        parts = split(t, dims)
        assert len(parts) == len(ranges) == len(r.hf)
        for part, (a, b) in zip(parts, ranges, strict=True):
            assert torch.equal(part, t[a:b])
        assert torch.equal(merge(parts, dims), t)
        assert sorted(ranges)[0][0] == 0 and sorted(ranges)[-1][1] == shape[0]
    assert found["gate_up"] is True and found["qkv"] is False and found["copy"] is False
    fc1 = next(r for r in mappings.rules_for(model) if r.transform == "gate_up")
    rows = driver._slice_shape(fc1, model)[0]
    split, merge = TRANSFORMS["gate_up"]
    monkeypatch.setitem(TRANSFORMS, "gate_up", (lambda t, d: split(t, d)[::-1], merge))
    assert driver._row_ranges(fc1, model) == [(rows // 2, rows), (0, rows // 2)]


def test_batches_keep_order_and_bound_size():
    sizes = [30, 30, 10, 70, 5, 5, 64]
    batches = driver._batches(list(range(len(sizes))), lambda i: sizes[i], 64)
    assert [i for b in batches for i in b] == list(range(len(sizes)))
    assert batches == [[0, 1], [2], [3], [4, 5], [6]]
    for b in batches:
        assert len(b) == 1 or sum(sizes[i] for i in b) <= 64


def test_bound_heap_sets_glibc_threshold():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert driver.bound_heap() is True


def test_sync_tree_counts_every_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("x", "a/y", "a/b/z"):
        (tmp_path / name).write_bytes(b"1")
    assert tensors.sync_tree(tmp_path) == 3
    assert tensors.sync_tree(tmp_path / "a") == 2
