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

import functools
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from zipfile import BadZipFile

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


def _index_chunk(shape: Sequence[int], index: Sequence[int], rows: tuple[int, int] | None = None):
    """The chunk of ``shape`` selected by fixing its leading axes to ``index`` and, with
    ``rows=(start, stop)``, narrowing the next axis."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    if len(index) > len(shape) or any(not 0 <= i < n for i, n in zip(index, shape, strict=False)):
        raise IndexError(f"index {tuple(index)} outside shape {tuple(shape)}")
    offsets = [*index, *([0] * (len(shape) - len(index)))]
    sizes = [*([1] * len(index)), *shape[len(index) :]]
    if rows is not None:
        start, stop = rows
        axis = len(index)
        if not 0 <= start < stop <= shape[axis]:
            raise IndexError(f"rows {rows} outside axis {axis} of shape {tuple(shape)}")
        offsets[axis], sizes[axis] = start, stop - start
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The view of ``tensor`` starting at ``offsets`` with ``sizes`` (one per axis)."""
    for axis, (start, length) in enumerate(zip(offsets, sizes, strict=True)):
        if start != 0 or length != tensor.shape[axis]:
            tensor = tensor.narrow(axis, start, length)
    return tensor


class _FileView(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable stream of its own:
    ``torch.load`` reads one stored tensor from the middle of a checkpoint file directly into
    its storage, with no intermediate copy."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._base, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._len - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._base + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


def _map_record(f, offset: int, length: int) -> torch.Tensor:
    """The tensor of one ``torch.save`` record at ``[offset, offset + length)`` of the open
    file ``f``, memory-mapped instead of read: no copy into fresh memory, and the pages are
    the page cache's (measured on ``tools/bench/convert.py``'s 2 GB checkpoint: ``mcore-to-hf``
    spends half the system time it did with ``torch.load`` reading each record).

    A record is a zip archive with stored (uncompressed) members (``torch.save``'s format):
    ``torch.load`` under ``torch.serialization.skip_data`` gives the tensor's dtype, shape,
    strides and storage offset without reading its bytes, and the zip member holding its one
    storage gives where the bytes are. The map is private and copy-on-write (a write to the
    tensor never reaches the file) and is released with the tensor. A record holding anything
    else (several storages, a compressed member, not a tensor) is read by ``torch.load``; bytes
    not aligned to the element size are copied into aligned memory. Raises ``ValueError`` or
    ``zipfile.BadZipFile`` for a damaged record and ``ValueError`` for one past the file's end.
    """
    import mmap
    import struct
    import zipfile

    view = _FileView(f, offset, length)
    with torch.serialization.skip_data():
        meta = torch.load(view, map_location="cpu", weights_only=True)
    view.seek(0)
    with zipfile.ZipFile(view) as z:
        storages = [i for i in z.infolist() if i.filename.split("/")[-2:-1] == ["data"]]
    if (
        not isinstance(meta, torch.Tensor)
        or len(storages) != 1
        or storages[0].compress_type != zipfile.ZIP_STORED
    ):
        view.seek(0)
        return torch.load(view, map_location="cpu", weights_only=True)
    member = storages[0]
    f.seek(offset + member.header_offset)
    local = f.read(30)  # the zip local file header (APPNOTE.TXT 4.3.7): 30 bytes
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"no zip local header for {member.filename} at {offset}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    first = offset + member.header_offset + 30 + name_len + extra_len
    nbytes = member.file_size
    if nbytes == 0:
        return meta
    base = first - first % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(
        f.fileno(),
        first - base + nbytes,
        flags=mmap.MAP_PRIVATE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=base,
    )
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=first - base)
    if first % meta.element_size():
        flat = flat.clone()
    return flat.view(meta.dtype).as_strided(meta.shape, meta.stride(), meta.storage_offset())


class _SliceLoadPlanner:
    """Copies each read item into the destination buffer of the slice that asked for it."""

    def __init__(self, buffers: dict[tuple[str, int], torch.Tensor]):
        self.buffers = buffers

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.buffers[(read_item.dest_index.fqn, read_item.dest_index.index)]
        return _narrow(dest, read_item.dest_offsets, read_item.lengths)

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

    def read(
        self, key: str, index: Sequence[int] = (), rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The global tensor ``key``, or its sub-tensor with the leading axes fixed to
        ``index`` (e.g. ``(layer,)`` or ``(layer, expert)``) and the next axis narrowed to
        ``rows=(start, stop)``."""
        return self.read_many([(key, tuple(index), rows)])[0]

    def read_many(self, requests: Iterable[tuple]) -> list[torch.Tensor]:
        """Several slices (``(key, index)`` or ``(key, index, rows)``) in one pass over the
        files, each stored tensor read once."""
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        requests = [(r[0], tuple(r[1]), r[2] if len(r) > 2 else None) for r in requests]
        per_key: dict[str, list] = {}
        slots = []
        for key, index, rows in requests:
            chunks = per_key.setdefault(key, [])
            slots.append((key, len(chunks), index, rows))
            chunks.append(_index_chunk(self._md(key).size, index, rows))
        buffers: dict[tuple[str, int], torch.Tensor] = {}
        items = []
        for key, chunks in per_key.items():
            md = self._md(key)
            for n, chunk in enumerate(chunks):  # untouched pages cost no memory
                buffers[(key, n)] = torch.empty(chunk.sizes, dtype=md.properties.dtype)
            items += create_read_items_for_chunk_list(key, md, chunks)
        covered: dict[tuple[str, int], int] = {}
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
            self._load(items, buffers)
        except (
            OSError, RuntimeError, EOFError, KeyError, AssertionError, ValueError, BadZipFile
        ) as e:  # fmt: skip
            raise CheckpointError(f"{self.directory}: reading {list(per_key)} failed: {e}") from e
        out = []
        for key, n, index, rows in slots:
            shape = list(self._md(key).size)[len(index) :]
            if rows is not None:
                shape[0] = rows[1] - rows[0]
            out.append(buffers[(key, n)].reshape(shape))
        return out

    def _load(self, items: list, buffers: dict) -> None:
        """Read ``items`` file by file in storage order. A stored tensor that is exactly one
        requested slice becomes that slice (no second copy); others are copied into place."""
        from torch.distributed.checkpoint.planner import LoadPlan

        infos = [self._reader.storage_data[item.storage_index] for item in items]
        if any(info.transform_descriptors for info in infos):  # compressed: torch's reader
            self._reader.read_data(LoadPlan(items), _SliceLoadPlanner(buffers)).wait()
            return
        per_file: dict[str, list] = {}
        for info, item in zip(infos, items, strict=True):
            per_file.setdefault(info.relative_path, []).append((info.offset, info, item))
        for path, entries in per_file.items():
            with open(self.directory / path, "rb") as f:
                for _, info, item in sorted(entries, key=lambda e: e[0]):
                    stored = _map_record(f, info.offset, info.length)
                    src = _narrow(stored, item.storage_offsets, item.lengths)
                    k = (item.dest_index.fqn, item.dest_index.index)
                    dest = buffers[k]
                    if src.numel() == stored.numel() == dest.numel():
                        populate_read(src)  # handed on whole: the writer reads all of it
                        buffers[k] = src.reshape(dest.shape)
                    else:
                        _narrow(dest, item.dest_offsets, item.lengths).copy_(src)
                    del stored, src

    def common(self) -> dict:
        """megatron-core's ``common.pt`` (the non-tensor part of the state), read with the
        restricted unpickler of ``megatron_lm.load_common`` (no pickled code runs)."""
        from megatron_llmjp.checkpoint.megatron_lm import load_common

        path = self.directory / "common.pt"
        if not path.is_file():
            return {}
        return load_common(path)

    def check_files(self) -> int:
        """Every byte range ``.metadata`` lists lies inside its shard file; returns the number
        of shard files. Raises ``CheckpointError`` naming a missing or truncated one."""
        need: dict[str, int] = {}
        for info in self._reader.storage_data.values():
            end = info.offset + info.length
            need[info.relative_path] = max(need.get(info.relative_path, 0), end)
        for name, size in sorted(need.items()):
            p = self.directory / name
            if not p.is_file():
                raise CheckpointError(
                    f"{self.directory}: shard {name} listed in .metadata is missing"
                )
            actual = p.stat().st_size
            if actual < size:
                raise CheckpointError(
                    f"{self.directory}: shard {name} has {actual} bytes but .metadata needs "
                    f"{size}; the checkpoint is truncated"
                )
        return len(need) + 1  # + .metadata


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for a file about to be written. Allocating blocks as writes
    arrive is the slow part on thin-provisioned and copy-on-write disks (measured here: a
    2 GB write took 1.4 s preallocated against 2.3 s not); harmless where unsupported."""
    with suppress(OSError, AttributeError):
        os.posix_fallocate(fd, 0, size)


@functools.cache
def libc_function(name: str, *argtypes) -> Callable | None:
    """The C library's function ``name`` with its ``ctypes`` argument types, or None where the
    library or the function is missing (not Linux, not glibc). Looked up once per name."""
    import ctypes
    import ctypes.util

    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    return fn


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages, do not wait


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> bool:
    """Ask the kernel to start writing ``nbytes`` bytes of ``fd`` from ``offset`` (0: to the
    end) to the disk now, without waiting (Linux ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``; no durability promise, the final ``fsync`` gives that). The
    disk then works while the next tensors are read and converted, instead of receiving
    everything at the final flush. Returns False where the call is unavailable."""
    import ctypes

    fn = libc_function(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    return fn is not None and fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE) == 0


_MADV_POPULATE_READ = 22  # <linux/mman.h>, Linux 5.14


def populate_read(tensor: torch.Tensor) -> bool:
    """Map the pages under a memory-mapped ``tensor`` now, for reading, in one call (Linux
    ``madvise(MADV_POPULATE_READ)`` over the page-aligned range of its bytes). Nothing is
    copied: a private file map gets the page cache's pages, read-only, as a first read would.
    A ``write()`` from an unpopulated map faults its pages in one at a time inside the
    kernel's copy loop. Measured on the 6.7 GB 8B-width model of ``tools/bench/convert.py``,
    three alternated in-process runs each, medians with and without: ``mcore-to-hf`` 4.80 s
    against 12.23 s (system time 3.9 s against 10.7 s), ``hf-to-mcore`` 5.79 s against
    10.52 s. Call it on a tensor that is about to be read whole. Returns False where the call
    is unavailable or refused."""
    import ctypes
    import mmap

    fn = libc_function("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    nbytes = tensor.numel() * tensor.element_size()
    if fn is None or nbytes == 0:
        return False
    start = tensor.data_ptr()
    base = start - start % mmap.PAGESIZE
    return fn(base, start - base + nbytes, _MADV_POPULATE_READ) == 0


def sync_tree(directory: str | Path, threads: int = 4) -> int:
    """Flush every file under ``directory`` and the directories themselves to the disk, once
    each and several at a time (an ``fsync`` waits for the device; concurrent ones share its
    queue). Call it once, after the last write and before publishing the directory by a
    rename; files the kernel has already written back cost one metadata round trip each.
    Returns the number of files synced. Raises ``OSError`` from a failing ``fsync``."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(directory)
    files = [p for p in root.rglob("*") if p.is_file()]
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]

    def flush(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(flush, files))
    for d in reversed(dirs):  # entries are durable once their directory is
        flush(d)
    return len(files)


class _WritePlanner:
    """The tensors of one write call by their ``MetadataIndex`` (the one method of a
    ``SavePlanner`` that ``FileSystemWriter.write_data`` calls)."""

    def __init__(self, data: dict):
        self.data = data

    def resolve_data(self, write_item):
        return self.data[write_item.index]


@contextmanager
def _no_record_crc32():
    """``torch.save`` without the zip CRC-32 of each record (``set_crc32_options``, public):
    ``torch.load`` does not check it, and computing it costs about as much as writing the
    bytes to the page cache (measured here: 0.21 s against 0.10 s for 470 MB)."""
    from torch.serialization import get_crc32_options, set_crc32_options

    before = get_crc32_options()
    set_crc32_options(False)
    try:
        yield
    finally:
        set_crc32_options(before)


class TensorWriter:
    """Writes a ``torch_dist`` checkpoint in groups of global slices.

    ``declare`` every tensor (key, global shape, dtype) up front, ``write`` slices as they are
    produced, then ``finish``: it refuses a tensor that was not completely written, so a
    checkpoint with holes cannot be produced.

    Each ``write`` call is one save plan for torch's public ``FileSystemWriter``: its slices
    are spread by size over ``threads`` files written concurrently (``thread_count``), named
    as the files of one rank of a distributed save (``__N_M.distcp``, the prefix assigned by
    ``prepare_global_plan``). Nothing is synced per file (``sync_files=False``); the kernel
    is asked to start writing each file out as soon as it is complete (``start_writeback``),
    and ``finish`` flushes the whole directory once (``sync_tree``), so the caller publishes
    it by a rename afterwards (``store.staged_output`` / ``store.publish``)."""

    def __init__(self, directory: str | Path, threads: int = 2):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.threads = max(1, int(threads))
        self._declared: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list] = {}
        self._written: dict[str, int] = {}
        self._results: list = []
        self._plans = 0

    def _storage_writer(self, threads: int):
        from torch.distributed.checkpoint import FileSystemWriter

        writer = FileSystemWriter(
            str(self.directory),
            single_file_per_rank=True,
            sync_files=False,
            thread_count=threads,
            # Tensors are on the CPU already: no copy-ahead (which would open a CUDA stream
            # on a machine with a GPU).
            per_thread_copy_ahead=0,
            overwrite=True,
        )
        writer.set_up_storage_writer(True)
        return writer

    def declare(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> None:
        if key in self._declared:
            raise CheckpointError(f"tensor {key!r} declared twice")
        self._declared[key] = TensorInfo(key, tuple(int(s) for s in shape), dtype)
        self._chunks[key] = []
        self._written[key] = 0

    def write(self, slices: Iterable[tuple]) -> None:
        """Write ``(key, leading index, tensor)`` slices (one stored record each) into new
        files; a fourth element ``row`` places a block of rows of the next axis at that
        offset. Raises ``CheckpointError`` for an undeclared key, a wrong shape or dtype."""
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import (
            SavePlan,
            TensorWriteData,
            WriteItem,
            WriteItemType,
        )

        items, data = [], {}
        for key, index, tensor, *row in slices:
            if key not in self._declared:
                raise CheckpointError(f"tensor {key!r} was not declared")
            info = self._declared[key]
            expected = list(info.shape[len(index) :])
            rows = None
            if row:
                rows = (row[0], row[0] + tensor.shape[0])
                expected[0] = tensor.shape[0]
            if tuple(tensor.shape) != tuple(expected):
                raise CheckpointError(
                    f"{key}{list(index)}: shape {tuple(tensor.shape)}, expected {tuple(expected)}"
                )
            chunk = _index_chunk(info.shape, tuple(index), rows)
            if tensor.dtype != info.dtype:
                raise CheckpointError(f"{key}: dtype {tensor.dtype}, declared {info.dtype}")
            tensor = tensor.detach().to("cpu").contiguous().reshape(chunk.sizes)
            mi = MetadataIndex(key, chunk.offsets)
            if mi in data:
                raise CheckpointError(f"{key}{list(index)}: the same chunk twice in one write")
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
        if not items:
            return
        writer = self._storage_writer(min(self.threads, len(items)))
        # The file prefix a coordinator gives the plan of rank N: one "rank" per write call.
        plans = writer.prepare_global_plan([SavePlan([])] * self._plans + [SavePlan(items)])
        self._plans += 1
        with _no_record_crc32():
            results = writer.write_data(plans[-1], _WritePlanner(data)).wait()
        for name in sorted({r.storage_data.relative_path for r in results}):
            fd = os.open(self.directory / name, os.O_RDONLY)
            try:
                start_writeback(fd)
            finally:
                os.close(fd)
        for item in items:
            key = item.index.fqn
            self._chunks[key].append(item.tensor_data.chunk)
            self._written[key] += int(item.tensor_data.chunk.sizes.numel())
        self._results.append(results)

    def finish(self, common: dict | None = None) -> None:
        """Write the metadata files (``.metadata``, ``common.pt``, ``metadata.json``) and
        flush the directory once; every declared tensor must be complete, else
        ``CheckpointError`` names the incomplete ones."""
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
        self._storage_writer(1).finish(md, self._results)
        torch.save(common or {}, self.directory / "common.pt")
        (self.directory / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        sync_tree(self.directory)
