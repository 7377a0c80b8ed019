"""``TensorReader`` maps each stored record instead of reading it. The reference for every
value is torch's own reader: ``torch.distributed.checkpoint.load`` for checkpoints torch's
``FileSystemWriter`` wrote here, and ``torch.load`` of each record for the checkpoints
Megatron-LM wrote (``../shared/data/megatron-lm/checkpoints``)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_llmjp.checkpoint import tensors
from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.checkpoint.tensors import TensorReader, _FileView, _map_record

MEGATRON_LM = Path(__file__).resolve().parents[2].parent / "shared/data/megatron-lm/checkpoints"


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(7, 5, generator=gen).to(torch.bfloat16),  # odd byte counts
        "fp32": torch.randn(3, 11, generator=gen),
        "transposed": torch.randn(6, 4, generator=gen).t(),  # stored with its strides
        "narrowed": torch.randn(9, 8, generator=gen)[2:5],  # a view of a larger storage
        "scalar": torch.tensor(3.5),
        "int64": torch.arange(13),
        "empty": torch.empty(0, 4),
    }


def _saved(directory: Path) -> dict[str, torch.Tensor]:
    state = _state()
    dcp.save(state, storage_writer=FileSystemWriter(str(directory), thread_count=1))
    return state


def test_mapped_reads_equal_torch_dcp_load(tmp_path):
    state = _saved(tmp_path)
    expected = {k: torch.empty_like(v) for k, v in state.items()}
    dcp.load(expected, storage_reader=FileSystemReader(str(tmp_path)))
    reader = TensorReader(tmp_path)
    for key, want in expected.items():
        got = reader.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert torch.equal(got, want), key
        assert torch.equal(got, state[key]), key


def test_mapped_tensor_is_copy_on_write(tmp_path):
    _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = TensorReader(tmp_path).read("fp32")
    got.add_(1.0)  # a private map: the file must not change
    del got
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(TensorReader(tmp_path).read("fp32"), _state()["fp32"])


def test_records_are_mapped_not_read(tmp_path, monkeypatch):
    """The large records come from ``mmap``; ``torch.load`` then only reads metadata."""
    _saved(tmp_path)
    maps = []
    real = mmap.mmap

    def counting(*args, **kwargs):
        maps.append(kwargs.get("offset", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(mmap, "mmap", counting)
    TensorReader(tmp_path).read("fp32")
    assert len(maps) == 1


def test_misaligned_record_is_copied_to_aligned_memory(tmp_path):
    """A record starting at an odd offset (Megatron-LM's files have them) still reads right."""
    import io

    t = torch.randn(4, 3).to(torch.bfloat16)
    buf = io.BytesIO()
    torch.save(t, buf)
    raw = buf.getvalue()
    path = tmp_path / "f"
    for pad in range(1, 4):
        path.write_bytes(b"x" * pad + raw)
        with open(path, "rb") as f:
            got = _map_record(f, pad, len(raw))
        assert torch.equal(got, t)
        assert got.data_ptr() % got.element_size() == 0


def test_truncated_shard_is_reported(tmp_path):
    _saved(tmp_path)
    shard = next(p for p in tmp_path.iterdir() if p.suffix == ".distcp")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    reader = TensorReader(tmp_path)
    with pytest.raises(CheckpointError, match="failed"):
        for key in _state():
            reader.read(key)


@pytest.mark.skipif(not MEGATRON_LM.is_dir(), reason="shared Megatron-LM checkpoints missing")
def test_megatron_lm_checkpoints_map_to_what_torch_load_reads():
    """Every record of every ``torch_dist`` checkpoint Megatron-LM wrote."""
    directories = sorted(p.parent for p in MEGATRON_LM.rglob(".metadata"))
    assert directories
    records = 0
    for directory in directories:
        reader = FileSystemReader(str(directory))
        metadata = reader.read_metadata()
        reader.set_up_storage_reader(metadata, True)
        for index, info in reader.storage_data.items():
            if not isinstance(metadata.state_dict_metadata[index.fqn], TensorStorageMetadata):
                continue  # a pickled object, not a tensor record
            with open(directory / info.relative_path, "rb") as f:
                want = torch.load(
                    _FileView(f, info.offset, info.length), map_location="cpu", weights_only=True
                )
                got = tensors._map_record(f, info.offset, info.length)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), (directory, info)
            records += 1
    assert records > 100


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_READ is Linux's")
def test_populate_read_maps_the_pages_without_copying(tmp_path):
    """``populate_read`` maps a record's pages at once (the kernel accepts the page-aligned
    range: Linux >= 5.14), its values stay those torch reads, and the map stays private."""
    _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    want = torch.empty(3, 11)
    dcp.load({"fp32": want}, storage_reader=FileSystemReader(str(tmp_path)))
    got = TensorReader(tmp_path).read("fp32")
    assert got.data_ptr() % mmap.PAGESIZE != 0  # the record's bytes start inside a page
    assert tensors.populate_read(got)
    assert torch.equal(got, want)
    got.add_(1.0)
    del got
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
