"""Streaming access to the tensors of a ``torch_dist`` checkpoint, without process groups.

megatron-core stores every tensor under a global key with its global shape; layer-stacked
tensors carry the layer (and, for experts, the expert) as leading axes, and each rank's shard
is one chunk of that global tensor. Reading a global slice (one layer, one expert) therefore
only touches the chunks that overlap it, whatever TP/PP/VPP/EP layout wrote them, and writing
whole global slices produces a checkpoint that megatron-core reshards into any layout on load.

``TensorReader`` and ``TensorWriter`` drive torch's distributed-checkpoint storage layer
(``FileSystemReader``/``FileSystemWriter``) directly with one read or write plan per call, so
memory holds only the slices of the current call: converters work layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llmjp.checkpoint.store import CheckpointError

# What megatron-core's dist_checkpointing writes next to the torch files.
MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _index_chunk(shape: Sequence[int], index: Sequence[int]):
    """The chunk of ``shape`` selected by fixing its leading axes to ``index``."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    if len(index) > len(shape) or any(not 0 <= i < n for i, n in zip(index, shape, strict=False)):
        raise IndexError(f"index {tuple(index)} outside shape {tuple(shape)}")
    offsets = (*index, *([0] * (len(shape) - len(index))))
    sizes = (*([1] * len(index)), *shape[len(index) :])
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


class _SliceLoadPlanner:
    """Copies each read item into the destination buffer of the slice that asked for it."""

    def __init__(self, buffers: dict[tuple[str, int], torch.Tensor]):
        self.buffers = buffers

    def resolve_tensor(self, read_item) -> torch.Tensor:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        dest = self.buffers[(read_item.dest_index.fqn, read_item.dest_index.index)]
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"unexpected object read for {read_item.dest_index.fqn}")


class TensorReader:
    """Global tensors (or slices of them) from a ``torch_dist`` checkpoint directory."""

    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise CheckpointError(
                f"{self.directory}: no .metadata file; not a torch_dist checkpoint directory"
            )
        self._reader = FileSystemReader(str(self.directory))
        try:
            self._metadata = self._reader.read_metadata()
        except Exception as e:  # unpickling a damaged file raises anything
            raise CheckpointError(f"{self.directory}/.metadata: unreadable ({e})") from e
        self._reader.set_up_storage_reader(self._metadata, True)
        self._tensors = {
            k: v
            for k, v in self._metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }

    def names(self) -> list[str]:
        """Tensor keys (objects such as ``_extra_state`` and RNG states are left out)."""
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        md = self._md(key)
        return TensorInfo(key, tuple(md.size), md.properties.dtype)

    def _md(self, key: str):
        if key not in self._tensors:
            raise CheckpointError(f"{self.directory}: no tensor {key!r} in the checkpoint")
        return self._tensors[key]

    def read(self, key: str, index: Sequence[int] = ()) -> torch.Tensor:
        """The global tensor ``key``, or its sub-tensor with the leading axes fixed to
        ``index`` (e.g. ``(layer,)`` or ``(layer, expert)``)."""
        return self.read_many([(key, tuple(index))])[0]

    def read_many(self, requests: Iterable[tuple[str, Sequence[int]]]) -> list[torch.Tensor]:
        """Several slices in one pass over the files (each file opened once)."""
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        requests = [(k, tuple(i)) for k, i in requests]
        per_key: dict[str, list[tuple[int, ...]]] = {}
        for key, index in requests:
            per_key.setdefault(key, []).append(index)
        buffers: dict[tuple[str, int], torch.Tensor] = {}
        items = []
        for key, indices in per_key.items():
            md = self._md(key)
            chunks = [_index_chunk(md.size, i) for i in indices]
            for n, chunk in enumerate(chunks):
                buffers[(key, n)] = torch.empty(chunk.sizes, dtype=md.properties.dtype)
            items += create_read_items_for_chunk_list(key, md, chunks)
        covered = {}
        for item in items:
            k = (item.dest_index.fqn, item.dest_index.index)
            covered[k] = covered.get(k, 0) + int(torch.Size(item.lengths).numel())
        for k, buf in buffers.items():
            if covered.get(k, 0) != buf.numel():
                raise CheckpointError(
                    f"{self.directory}: tensor {k[0]!r} is incomplete (its stored chunks cover "
                    f"{covered.get(k, 0)} of {buf.numel()} elements of the requested slice)"
                )
        try:
            self._reader.read_data(LoadPlan(items), _SliceLoadPlanner(buffers)).wait()
        except (OSError, RuntimeError, EOFError, KeyError, AssertionError) as e:
            raise CheckpointError(f"{self.directory}: reading {list(per_key)} failed: {e}") from e
        out = []
        seen: dict[str, int] = {}
        for key, index in requests:
            n = seen.get(key, 0)
            seen[key] = n + 1
            out.append(buffers[(key, n)].reshape(tuple(self._md(key).size)[len(index) :]))
        return out

    def common(self) -> dict:
        """megatron-core's ``common.pt`` (the non-tensor part of the state)."""
        path = self.directory / "common.pt"
        if not path.is_file():
            return {}
        return torch.load(path, map_location="cpu", weights_only=False)


class _WritePlanner:
    def __init__(self, data: dict):
        self.data = data

    def resolve_data(self, write_item):
        return self.data[write_item.index]


class TensorWriter:
    """Writes a ``torch_dist`` checkpoint in groups of global slices (one file per group).

    ``declare`` every tensor (key, global shape, dtype) up front, ``write`` slices as they are
    produced, then ``finish``: it refuses a tensor that was not completely written, so a
    checkpoint with holes cannot be produced."""

    def __init__(self, directory: str | Path):
        from torch.distributed.checkpoint import FileSystemWriter

        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = FileSystemWriter(str(self.directory), single_file_per_rank=True)
        self._writer.set_up_storage_writer(True)
        self._declared: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list] = {}
        self._written: dict[str, int] = {}
        self._results: list = []
        self._files = 0

    def declare(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        if key in self._declared:
            raise CheckpointError(f"tensor {key!r} declared twice")
        self._declared[key] = TensorInfo(key, tuple(int(s) for s in shape), dtype)
        self._chunks[key] = []
        self._written[key] = 0

    def write(self, slices: Iterable[tuple[str, Sequence[int], torch.Tensor]]) -> None:
        """Write ``(key, leading index, tensor)`` slices into one new file."""
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import (
            SavePlan,
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        items, data = [], {}
        for key, index, tensor in slices:
            if key not in self._declared:
                raise CheckpointError(f"tensor {key!r} was not declared")
            info = self._declared[key]
            chunk = _index_chunk(info.shape, tuple(index))
            if tuple(tensor.shape) != info.shape[len(index) :]:
                raise CheckpointError(
                    f"{key}{list(index)}: shape {tuple(tensor.shape)}, expected "
                    f"{info.shape[len(index) :]}"
                )
            if tensor.dtype != info.dtype:
                raise CheckpointError(f"{key}: dtype {tensor.dtype}, declared {info.dtype}")
            tensor = tensor.detach().to("cpu").contiguous().reshape(chunk.sizes)
            mi = MetadataIndex(key, chunk.offsets)
            items.append(
                WriteItem(
                    index=mi,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk,
                        properties=TensorProperties.create_from_tensor(tensor),
                        size=torch.Size(info.shape),
                    ),
                )
            )
            data[mi] = tensor
            self._chunks[key].append(chunk)
            self._written[key] += tensor.numel()
        if not items:
            return
        from torch.distributed.checkpoint.filesystem import _StoragePrefix

        plan = SavePlan(items, storage_data=_StoragePrefix(f"__{self._files}_"))
        self._files += 1
        self._results.append(self._writer.write_data(plan, _WritePlanner(data)).wait())

    def finish(self, common: dict | None = None) -> None:
        """Write the metadata files; every declared tensor must be complete."""
        from torch.distributed.checkpoint.metadata import (
            Metadata,
            TensorProperties,
            TensorStorageMetadata,
        )

        incomplete = [
            f"{k} ({self._written[k]} of {torch.Size(i.shape).numel()} elements)"
            for k, i in self._declared.items()
            if self._written[k] != torch.Size(i.shape).numel()
        ]
        if incomplete:
            raise CheckpointError(
                f"{self.directory}: tensors not completely written: {', '.join(incomplete[:5])}"
            )
        md = Metadata(
            state_dict_metadata={
                k: TensorStorageMetadata(
                    properties=TensorProperties(dtype=i.dtype),
                    size=torch.Size(i.shape),
                    chunks=self._chunks[k],
                )
                for k, i in self._declared.items()
            }
        )
        self._writer.finish(md, self._results)
        torch.save(common or {}, self.directory / "common.pt")
        (self.directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
