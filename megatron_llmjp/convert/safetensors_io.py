"""Sharded safetensors: a streaming writer and a lazy reader.

The writer knows every tensor's name, dtype and shape before the first byte (the driver
derives them from the checkpoint metadata), so it writes each shard's header first and then
appends tensors as they are produced: memory never holds more than the tensor being written,
and the shard size is independent of the memory. The on-disk format is the safetensors one
(8-byte little-endian header length, JSON header padded to 8 bytes, raw little-endian data),
with ``model.safetensors.index.json`` as transformers writes it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_llmjp.checkpoint.tensors import populate_read, preallocate, start_writeback
from megatron_llmjp.convert.transforms import ConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES = {v: k for k, v in _CODES.items()}
# Tensors of at least this size are handed to the disk as soon as they are written.
WRITEBACK_BYTES = 2**20


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


def parse_size(text: str) -> int:
    """``"5GB"``, ``"512MB"`` or a byte count."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper()
    for u, f in units.items():
        if t.endswith(u) and t[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * f)
    if t.isdigit():
        return int(t)
    raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 512MB or a byte count")


class ShardedWriter:
    """Writes ``entries`` (in this order) into shards of at most ``max_shard_bytes``."""

    def __init__(self, directory: Path, entries: list[Entry], max_shard_bytes: int):
        self.directory = Path(directory)
        shards: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if e.dtype not in _CODES:
                raise ConversionError(f"{e.name}: dtype {e.dtype} cannot be written")
            if shards[-1] and size + e.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(e)
            size += e.nbytes
        n = len(shards)
        self.files = (
            [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shards = shards
        self._order = [(i, e) for i, s in enumerate(shards) for e in s]
        self._pos = 0
        self._rows = 0  # rows of the current tensor already written
        self._file = None
        self._open_index = -1
        self.total_bytes = sum(e.nbytes for e in entries)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def _open(self, i: int) -> None:
        self._close_file()
        header, offset = {}, 0
        for e in self._shards[i]:
            header[e.name] = {
                "dtype": _CODES[e.dtype],
                "shape": list(e.shape),
                "data_offsets": [offset, offset + e.nbytes],
            }
            offset += e.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.directory / self.files[i], "wb")  # noqa: SIM115
        preallocate(self._file.fileno(), 8 + len(raw) + offset)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._open_index = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor whole."""
        self.write_rows(name, tensor)
        if self._rows:
            raise ConversionError(f"tensor {name}: {tuple(tensor.shape)} is only part of it")

    def write_rows(self, name: str, block: torch.Tensor) -> None:
        """Write the next rows of the next planned tensor (blocks arrive in row order)."""
        if self._pos >= len(self._order):
            raise ConversionError(f"unplanned tensor {name} (all planned tensors were written)")
        i, e = self._order[self._pos]
        rows = block.shape[0] if block.dim() else 1
        fits = tuple(block.shape[1:]) == e.shape[1:] and self._rows + rows <= (e.shape or (1,))[0]
        if name != e.name or block.dtype != e.dtype or not fits:
            raise ConversionError(
                f"tensor {name} {tuple(block.shape)} {block.dtype} arrived where "
                f"{e.name} {e.shape} {e.dtype} was planned"
            )
        if i != self._open_index:
            self._open(i)
        data = block.detach().contiguous().cpu().view(torch.uint8).reshape(-1)
        start = self._file.tell()
        self._file.write(data.numpy().data)
        if data.numel() >= WRITEBACK_BYTES:  # the disk works while the next tensor comes
            self._file.flush()
            start_writeback(self._file.fileno(), start, data.numel())
        self._rows += rows
        if self._rows == (e.shape or (1,))[0]:
            self._pos, self._rows = self._pos + 1, 0

    def close(self) -> None:
        self._close_file()
        if self._pos != len(self._order):
            missing = [e.name for _, e in self._order[self._pos : self._pos + 3]]
            raise ConversionError(f"{len(self._order) - self._pos} tensors not written: {missing}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e.name: self.files[i] for i, e in self._order},
            }
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")


class HFReader:
    """Tensors of an HF model directory by name, read lazily (memory-mapped) from its shards."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = data["weight_map"]
                if not isinstance(weight_map, dict) or not weight_map:
                    raise TypeError("weight_map is empty or not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index}: corrupted index ({e})") from e
        elif (self.directory / SINGLE).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.directory}: neither {INDEX} nor {SINGLE} found")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise ConversionError(f"{self.directory}: shard {f} listed in {INDEX} is missing")
            self._headers[f], self._data_start[f] = _read_header(path)
        self.where: dict[str, str] = {}
        for f, header in self._headers.items():
            for name in header:
                if name != "__metadata__":
                    self.where[name] = f
        if weight_map:
            for name, f in weight_map.items():
                if self.where.get(name) != f:
                    raise ConversionError(f"{index}: {name} is mapped to {f}, which lacks it")

    def names(self) -> list[str]:
        return list(self.where)

    def entry(self, name: str) -> Entry:
        h = self._headers[self.where[name]][name]
        if h["dtype"] not in _DTYPES:
            raise ConversionError(f"{self.where[name]}: {name} has unsupported dtype {h['dtype']}")
        return Entry(name, tuple(h["shape"]), _DTYPES[h["dtype"]])

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or its ``rows=(start, stop)``) as a private memory map of its bytes
        in the shard: no copy, and no fresh memory to fault in, until something writes to it
        (copy-on-write; the file never changes). The pages are those of the page cache, mapped
        at once (``populate_read``), and count towards this process's resident memory only
        while the tensor lives: the map is released with it. Raises ``ConversionError`` for a
        truncated shard."""
        e = self.entry(name)
        f = self.where[name]
        start, end = self._headers[f][name]["data_offsets"]
        shape = list(e.shape)
        if rows is not None:
            row_bytes = (end - start) // max(shape[0], 1)
            start, end = start + rows[0] * row_bytes, start + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        if end == start:
            return torch.empty(shape, dtype=e.dtype)
        first = self._data_start[f] + start
        base = first - first % mmap.ALLOCATIONGRANULARITY
        path = self.directory / f
        try:
            with open(path, "rb") as fh:
                view = mmap.mmap(
                    fh.fileno(),
                    first - base + end - start,
                    # Not MAP_POPULATE: on a writable private map it would copy every page.
                    flags=mmap.MAP_PRIVATE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=base,
                )
        except (OSError, ValueError) as err:  # past the end of the file
            raise ConversionError(f"{path}: truncated while reading {name} ({err})") from err
        count = (end - start) // torch.empty((), dtype=e.dtype).element_size()
        tensor = torch.frombuffer(view, dtype=e.dtype, count=count, offset=first - base)
        populate_read(tensor)  # the caller reads every byte it asked for
        return tensor.view(shape)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data section)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end})")
    return header, 8 + n
