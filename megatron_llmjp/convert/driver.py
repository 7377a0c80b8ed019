"""The one conversion driver: walks a mapping table layer by layer in either direction.

megatron-core checkpoints store global (layout-independent) tensors, so "merging" TP/PP/VPP/EP
shards is reading global slices through ``checkpoint.tensors.TensorReader``, and "splitting"
for a new layout is writing global slices that megatron-core reshards on load. Every name,
shape and dtype is planned and checked from metadata before any tensor data moves; the
output is written under a temporary name next to the destination and renamed only after the
parity check passed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import describe_checkpoint, model_section
from megatron_llmjp.checkpoint.megatron_lm import is_optimizer_key
from megatron_llmjp.checkpoint.tensors import TensorReader, TensorWriter, libc_function, sync_tree
from megatron_llmjp.convert import hf_config, mappings
from megatron_llmjp.convert.mappings import Rule
from megatron_llmjp.convert.safetensors_io import Entry, HFReader, ShardedWriter
from megatron_llmjp.convert.transforms import ROW_PREFIX, TRANSFORMS, ConversionError
from megatron_llmjp.parallel.layout import smallest_layout

# Model-scope tensors above this size (the embedding and output layer of a 196,608 vocabulary)
# move in blocks of rows of about this size, so they are never held whole.
BLOCK_BYTES = 64 * 2**20


@dataclass
class Report:
    """What a conversion did (printed by the CLI, asserted on by tests and benchmarks)."""

    output: Path
    tensors: int
    bytes: int
    seconds: float
    parity: dict | None = None
    notes: list[str] | None = None
    """Where derived values came from (a Megatron-LM checkpoint's model and vocabulary)."""


# -- shared plumbing -----------------------------------------------------------------------


class _Progress:
    """The conversion progress bar (``megatron_llmjp.progress``) over tensor groups, with bytes
    and throughput; ``bytes`` is the total written for the report."""

    def __init__(self, total: int, what: str, enabled: bool):
        from megatron_llmjp.progress import progress_bar

        self.total, self.bytes, self.done = total, 0, 0
        self.t0 = time.perf_counter()
        self.bar = progress_bar(total, f"[convert] {what}", unit="group", enabled=enabled)

    def step(self, nbytes: int, advance: bool = True) -> None:
        self.done += advance
        self.bytes += nbytes
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(
            f"{self.bytes / 1e9:.2f} GB {self.bytes / 1e9 / dt:.2f} GB/s", refresh=False
        )
        if advance:
            self.bar.update(1)
        if self.done == self.total and advance:
            self.bar.close()


class _WriteBehind:
    """Runs each batch's writes in one background thread while the next batch is read:
    at most two batches (``_batches``, up to ``BLOCK_BYTES`` each) are in memory, and reading
    overlaps writing (both release the GIL). An error in a write is raised here, in the
    caller's thread."""

    def __enter__(self) -> _WriteBehind:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = None
        return self

    def submit(self, fn) -> None:
        self.wait()
        self._pending = self._pool.submit(fn)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True)


def bound_heap(threshold: int = 2**20) -> bool:
    """Make freed tensor memory go back to the kernel at once (glibc ``mallopt``, process
    wide). glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB, mallopt(3)), so after the first few MB tensor, such tensors come from the heap,
    which keeps their pages when they are freed between other live blocks: measured on
    ``tools/bench/convert.py``, 135 MB more peak RSS in ``mcore-to-hf``. A fixed threshold
    serves every block of ``threshold`` bytes or more with its own mapping, returned on free.
    Returns False where the C library has no ``mallopt`` (not glibc): nothing changes."""
    import ctypes

    m_mmap_threshold = -3  # <malloc.h>
    mallopt = libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and bool(mallopt(m_mmap_threshold, int(threshold)))


def _groups(rules: list[Rule], num_layers: int) -> list[tuple[str, list[Rule], int | None]]:
    """(label, rules, layer) in file order: the model-scope rules before the first layer rule,
    every layer, then the remaining model-scope rules."""
    first = next(i for i, r in enumerate(rules) if r.scope != "model")
    pre = [r for r in rules[:first] if r.scope == "model"]
    post = [r for r in rules[first:] if r.scope == "model"]
    per_layer = [r for r in rules if r.scope != "model"]
    out = [("embedding", pre, None)]
    out += [(f"layer {layer}", per_layer, layer) for layer in range(num_layers)]
    out.append(("head", post, None))
    return out


def _runs(rules: list[Rule], model: dict, dtype: torch.dtype) -> list[tuple[bool, list[Rule]]]:
    """A group's rules in order, as (streamed in row blocks?, rules) runs."""
    size = torch.empty((), dtype=dtype).element_size()
    runs: list[tuple[bool, list[Rule]]] = []
    for r in rules:
        big = (
            r.scope == "model"
            and r.transform in ROW_PREFIX
            and torch.Size(mappings.global_shape(r, model)).numel() * size > BLOCK_BYTES
        )
        if big or not runs or runs[-1][0]:
            runs.append((big, [r]))
        else:
            runs[-1][1].append(r)
    return runs


def _row_blocks(shape: tuple[int, ...], dtype: torch.dtype) -> list[tuple[int, int]]:
    row = torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
    step = max(1, BLOCK_BYTES // max(row, 1))
    return [(a, min(shape[0], a + step)) for a in range(0, shape[0], step)]


def _batches(work: list, nbytes, limit: int) -> list[list]:
    """``work`` in order, cut into consecutive batches of at most ``limit`` bytes
    (``nbytes(item)``); an item larger than ``limit`` is a batch of its own. One batch is one
    read and one write call: memory holds two batches at most (one read, one being written)."""
    out: list[list] = []
    size = 0
    for item in work:
        n = nbytes(item)
        if not out or (out[-1] and size + n > limit):
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def _row_ranges(rule: Rule, model: dict) -> list[tuple[int, int]] | None:
    """The rows ``(start, stop)`` of the megatron slice that each HF tensor of ``rule`` is, in
    ``rule.hf`` order, when its transform splits the slice into two or more consecutive
    blocks of rows that together are the whole slice (SwiGLU ``linear_fc1`` = [gate; up]);
    else None. Found by running the transform's split on the row numbers (one column), so
    it follows ``TRANSFORMS`` whatever they are. Such HF tensors are read from, or written
    to, their rows of the checkpoint directly (one stored chunk each): no concatenation or
    split copy in memory."""
    shape = _slice_shape(rule, model)
    if not shape:
        return None
    rows = torch.arange(shape[0]).reshape(shape[0], *([1] * (len(shape) - 1)))
    out = []
    for part in TRANSFORMS[rule.transform][0](rows, mappings.dims_of(model)):
        flat = part.reshape(-1)
        if part.dim() == 0 or flat.numel() == 0 or flat.numel() != part.shape[0]:
            return None
        start = int(flat[0])
        if not torch.equal(flat, torch.arange(start, start + flat.numel())):
            return None
        out.append((start, start + flat.numel()))
    edges = sorted(out)
    whole = edges and edges[0][0] == 0 and edges[-1][1] == shape[0]
    if (
        len(out) < 2
        or not whole
        or any(x[1] != y[0] for x, y in zip(edges, edges[1:], strict=False))
    ):
        return None
    return out


def _slice_bytes(rule: Rule, model: dict, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return torch.Size(_slice_shape(rule, model)).numel() * size


def _slice_shape(rule: Rule, model: dict) -> tuple[int, ...]:
    return mappings.global_shape(rule, model)[len(mappings.stacked(rule, model)) :]


def _hf_shapes(rule: Rule, model: dict, dtype: torch.dtype) -> list[tuple[int, ...]]:
    """The HF shapes of one slice, derived by running the transform on a meta tensor."""
    split = TRANSFORMS[rule.transform][0]
    meta = torch.empty(_slice_shape(rule, model), dtype=dtype, device="meta")
    return [tuple(t.shape) for t in split(meta, mappings.dims_of(model))]


def _tokenizer_vocab(tokenizer: str, model: dict) -> int:
    """The size of ``--tokenizer``; refuses one with ids the model has no embedding for."""
    from megatron_llmjp.data.tokenizer import Tokenizer

    try:
        size = Tokenizer.from_path(tokenizer).vocab_size
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer {tokenizer}: {e}") from e
    if size > model["vocab_size"]:
        raise ConversionError(
            f"--tokenizer {tokenizer} has {size} ids, the model's vocabulary is "
            f"{model['vocab_size']}: ids >= {model['vocab_size']} would have no embedding"
        )
    return size


def _default_token_ids() -> tuple[dict[str, int], list[int]]:
    """Without ``--tokenizer``: the LLM-jp-4 ids of the tokenizer module's table (config ids,
    generation stop ids EOS + EOD)."""
    from megatron_llmjp.data.tokenizer import LLMJP4_IDS

    ids = {"bos_token_id": LLMJP4_IDS.bos, "eos_token_id": LLMJP4_IDS.eos}
    ids["pad_token_id"] = LLMJP4_IDS.pad
    return ids, [LLMJP4_IDS.eos, LLMJP4_IDS.eod]


# -- megatron -> HF ------------------------------------------------------------------------


def claim_tensors(
    rules: list[Rule], model: dict, reader: TensorReader, directory: Path
) -> dict[str, str]:
    """Rule key -> key stored in the checkpoint. Every rule's tensor must be there with the
    shape ``model`` implies, and every stored model tensor must be claimed by a rule.
    Optimizer state (``optimizer.*``, ``chained_N.optimizer.*``) is not model state: ignored."""
    stored = {k for k in reader.names() if not is_optimizer_key(k)}
    resolved, missing = {}, []
    for r in rules:
        found = [k for k in (r.mcore, *mappings.ALIASES.get(r.mcore, ())) if k in stored]
        if found:
            resolved[r.mcore] = found[0]
        else:
            missing.append(r.mcore)
    if missing:
        raise ConversionError(f"{directory}: checkpoint lacks tensors {missing}")
    leftover = sorted(stored - set(resolved.values()))
    if leftover:
        raise ConversionError(
            f"{directory}: tensors with no mapping (refusing to drop them): {leftover[:6]}"
        )
    for r in rules:
        info = reader.info(resolved[r.mcore])
        expected = mappings.global_shape(r, model)
        if info.shape != expected:
            raise ConversionError(
                f"{directory}: {info.key} has shape {info.shape}, the manifest's model implies "
                f"{expected}"
            )
    return resolved


def mcore_to_hf(
    src: str | Path,
    output: str | Path,
    *,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 10**9,
    parity: bool = True,
    parity_text: list[str] | None = None,
    parity_device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Report:
    """Export a training checkpoint (root or ``iter_*`` directory; this package's or
    Megatron-LM's) as an HF model directory. ``vocab_size`` is the true vocabulary of a
    Megatron-LM checkpoint whose args lack it (else ``tokenizer``'s size is used)."""
    t0 = time.perf_counter()
    bound_heap()
    directory = store.resolve(src, "--input")
    manifest = describe_checkpoint(directory, vocab_size=vocab_size, tokenizer=tokenizer)
    notes = []
    if manifest.get("format") == "megatron-lm":
        notes = [
            f"{directory}: written by Megatron-LM (iteration {manifest['iteration']}); model "
            f"from {manifest['source']['model']}",
            f"vocabulary {manifest['model']['vocab_size']} (padded "
            f"{manifest['model']['padded_vocab_size']}) from {manifest['source']['vocab_size']}",
        ]
        if progress:
            for n in notes:
                print(f"[convert] {n}", file=sys.stderr, flush=True)
    model = manifest["model"]
    rules = mappings.rules_for(model)
    reader = TensorReader(directory)
    keys = claim_tensors(rules, model, reader, directory)
    out_dtype = dtype or reader.info(keys[rules[0].mcore]).dtype
    groups = _groups(rules, model["num_layers"])
    entries = []
    for _, group_rules, layer in groups:
        for r in group_rules:
            for index in mappings.indices(r, model, layer):
                names = mappings.hf_names(r, index)
                shapes = _hf_shapes(r, model, out_dtype)
                entries += [Entry(n, s, out_dtype) for n, s in zip(names, shapes, strict=True)]
    if tokenizer is not None:
        _tokenizer_vocab(tokenizer, model)
    dims = mappings.dims_of(model)
    with store.staged_output(Path(output), force) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_size)
        bar = _Progress(len(groups), "mcore->hf", progress)
        with _WriteBehind() as behind:
            for _, group_rules, layer in groups:
                for streamed, rules_ in _runs(group_rules, model, out_dtype):
                    if streamed:
                        _export_rows(rules_[0], model, keys, reader, writer, behind, bar, out_dtype)
                        continue
                    work = [(r, i) for r in rules_ for i in mappings.indices(r, model, layer)]
                    for batch in _batches(
                        work, lambda w: _slice_bytes(w[0], model, out_dtype), BLOCK_BYTES
                    ):
                        outputs = _export_batch(batch, model, keys, reader, dims)

                        def write(outputs=outputs) -> None:
                            for name, o in outputs:
                                writer.write(name, o.to(out_dtype))
                            nbytes = sum(o.numel() * o.element_size() for _, o in outputs)
                            bar.step(nbytes, False)

                        behind.submit(write)
                        del outputs
                behind.submit(lambda: bar.step(0))
        writer.close()
        if tokenizer is not None:
            from megatron_llmjp.convert.hf_tokenizer import export_tokenizer

            exported = export_tokenizer(tokenizer, tmp)
            token_ids, stop_ids = exported.token_ids, exported.stop_ids
        else:
            token_ids, stop_ids = _default_token_ids()
        config = hf_config.to_hf_config(
            model, out_dtype, token_ids, tokenizer_ids=tokenizer is not None
        )
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json", hf_config.generation_config(token_ids, stop_ids)
        )
        sync_tree(tmp)  # once, before the rename publishes it
        result = None
        if parity:
            from megatron_llmjp.convert.parity import check_parity
            from megatron_llmjp.convert.parity import parity_device as device_of
            from megatron_llmjp.parallel import cpu_compat

            if device_of(parity_device).type == "cpu":
                cpu_compat.force_cpu()  # the check runs on CPU, also on a GPU node

            result = check_parity(
                tmp, directory, text=parity_text, manifest=manifest, device=parity_device
            )
    return Report(
        Path(output), len(entries), writer.total_bytes, time.perf_counter() - t0, result, notes
    )


def _export_batch(batch, model, keys, reader, dims) -> list[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a batch of (rule, index), read in one pass over the files. HF
    tensors that are blocks of rows of the slice (``_row_ranges``) are read as those rows."""
    requests, plan = [], []
    for r, index in batch:
        names = mappings.hf_names(r, index)
        ranges = _row_ranges(r, model)
        if ranges is None:
            plan.append((r, names, len(requests)))
            requests.append((keys[r.mcore], index))
        else:
            plan.append((None, names, len(requests)))
            requests += [(keys[r.mcore], index, rows) for rows in ranges]
    tensors = reader.read_many(requests)
    outputs = []
    for r, names, at in plan:
        if r is None:
            outs = tensors[at : at + len(names)]
        else:
            outs = TRANSFORMS[r.transform][0](tensors[at], dims)
        outputs += zip(names, outs, strict=True)
    return outputs


def _export_rows(rule, model, keys, reader, writer, behind, bar, dtype) -> None:
    """One big row-prefix tensor, read and written in blocks of rows."""
    name = mappings.hf_names(rule, ())[0]
    (shape,) = _hf_shapes(rule, model, dtype)
    for a, b in _row_blocks(shape, dtype):
        block = reader.read(keys[rule.mcore], (), (a, b))

        def write(block=block) -> None:
            writer.write_rows(name, block.to(dtype))
            bar.step(block.numel() * block.element_size(), False)

        behind.submit(write)
        del block


def _import_batch(batch, model, reader, dims, dtype) -> list[tuple]:
    """``TensorWriter.write`` slices of a batch of (rule, index). HF tensors that are blocks
    of rows of the slice (``_row_ranges``) become chunks of rows (no concatenation)."""
    slices = []
    for r, index in batch:
        names = mappings.hf_names(r, index)
        ranges = _row_ranges(r, model)
        if ranges is None:
            merge = TRANSFORMS[r.transform][1]
            slices.append((r.mcore, index, merge([reader.read(n).to(dtype) for n in names], dims)))
        else:
            for n, (start, _) in zip(names, ranges, strict=True):
                slices.append((r.mcore, index, reader.read(n).to(dtype), start))
    return slices


def _import_rows(rule, model, reader, writer, behind, bar, dtype) -> None:
    """One big row-prefix tensor from HF in blocks of rows, then its zero padding rows."""
    name = mappings.hf_names(rule, ())[0]
    (shape,) = _hf_shapes(rule, model, dtype)
    rows = mappings.global_shape(rule, model)[0]
    for a, b in _row_blocks(shape, dtype):
        block = reader.read(name, (a, b)).to(dtype)

        def write(a=a, block=block) -> None:
            writer.write([(rule.mcore, (), block, a)])
            bar.step(block.numel() * block.element_size(), False)

        behind.submit(write)
        del block
    if rows > shape[0]:
        pad = torch.zeros((rows - shape[0], *shape[1:]), dtype=dtype)
        behind.submit(lambda: writer.write([(rule.mcore, (), pad, shape[0])]))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- HF -> megatron ------------------------------------------------------------------------


def _target_config(model, dtype: torch.dtype, overrides: list[str]):
    """The run config the checkpoint is written for: the HF model plus the ``--set`` flags.
    Only the sections a conversion uses are checked (``WEIGHTS_ONLY``): the training data
    need not exist where the conversion runs."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.config.validate import WEIGHTS_ONLY, validate_static

    bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    if bad:
        raise ConversionError(
            f"--set {bad[0]}: the model comes from the HF config.json and cannot be overridden"
        )
    cfg = build_config(None, overrides, uses=WEIGHTS_ONLY)
    precision = replace(cfg.precision, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    cfg = replace(cfg, model=model, precision=precision)
    validate_static(cfg, WEIGHTS_ONLY)
    return cfg


def hf_to_mcore(
    src: str | Path,
    output: str | Path,
    *,
    overrides: list[str] | None = None,
    dtype: torch.dtype | None = None,
    parity: bool = True,
    parity_text: list[str] | None = None,
    parity_device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Report:
    """Write an HF model directory as a checkpoint root (``iter_0000000`` + ``latest``) that
    the trainer starts from with ``checkpoint.load=OUTPUT checkpoint.load_optimizer=false``."""
    from megatron_llmjp.checkpoint.state import finish_weights_checkpoint

    t0 = time.perf_counter()
    bound_heap()
    if not parity or str(parity_device).partition(":")[0] != "cuda":
        from megatron_llmjp.parallel import cpu_compat

        # Tensors only, on CPU, also on a GPU node (megatron-core is not needed for that).
        cpu_compat.pin_cpu()
    src = Path(src)
    src_config = hf_config.read_hf_config(src)
    model_cfg, hf_dtype = hf_config.model_config_from_hf(src_config, src)
    kept = hf_config.release_fields(src_config, model_section(model_cfg, 1, "sequential"))
    model_cfg = replace(model_cfg, hf_config=json.dumps(kept, sort_keys=True) if kept else "")
    out_dtype = dtype or hf_dtype
    cfg = _target_config(model_cfg, out_dtype, list(overrides or []))
    layout = smallest_layout(cfg.parallel, cfg.model, cfg.train)
    model = model_section(cfg.model, layout.tp, "sequential")
    rules = mappings.rules_for(model)
    reader = HFReader(src)
    groups = _groups(rules, model["num_layers"])
    wanted: dict[str, tuple[int, ...]] = {}
    for _, group_rules, layer in groups:
        for r in group_rules:
            shapes = _hf_shapes(r, model, out_dtype)
            for index in mappings.indices(r, model, layer):
                wanted.update(zip(mappings.hf_names(r, index), shapes, strict=True))
    present = set(reader.names())
    missing = [n for n in wanted if n not in present]
    if missing:
        raise ConversionError(f"{src}: missing tensors {missing[:6]} ({len(missing)} in all)")
    leftover = sorted(present - set(wanted))
    if leftover:
        raise ConversionError(
            f"{src}: tensors with no mapping (refusing to drop them): {leftover[:6]}"
        )
    for name, shape in wanted.items():
        found = reader.entry(name).shape
        if found != shape:
            raise ConversionError(
                f"{src}/{reader.where[name]}: {name} has shape {found}, config.json implies {shape}"
            )
    dims = mappings.dims_of(model)
    with store.staged_output(Path(output), force) as tmp:
        ckpt = tmp / store.iter_name(0)
        writer = TensorWriter(ckpt)
        for r in rules:
            writer.declare(r.mcore, mappings.global_shape(r, model), out_dtype)
        bar = _Progress(len(groups), "hf->mcore", progress)
        with _WriteBehind() as behind:
            for _, group_rules, layer in groups:
                for streamed, rules_ in _runs(group_rules, model, out_dtype):
                    if streamed:
                        _import_rows(rules_[0], model, reader, writer, behind, bar, out_dtype)
                        continue
                    work = [(r, i) for r in rules_ for i in mappings.indices(r, model, layer)]
                    for batch in _batches(
                        work, lambda w: _slice_bytes(w[0], model, out_dtype), BLOCK_BYTES
                    ):
                        slices = _import_batch(batch, model, reader, dims, out_dtype)
                        nbytes = sum(t.numel() * t.element_size() for _, _, t, *_ in slices)

                        def write(slices=slices, nbytes=nbytes) -> None:
                            writer.write(slices)
                            bar.step(nbytes, False)

                        behind.submit(write)
                        del slices
                behind.submit(lambda: bar.step(0))
        finish_weights_checkpoint(tmp, writer, cfg, layout, {"hf_directory": str(src.resolve())})
        sync_tree(tmp)  # what was written after the tensors (config.yaml), before the rename
        result = None
        if parity:
            from megatron_llmjp.convert.parity import check_parity
            from megatron_llmjp.convert.parity import parity_device as device_of
            from megatron_llmjp.parallel import cpu_compat

            if device_of(parity_device).type == "cpu":
                cpu_compat.force_cpu()  # the check runs on CPU, also on a GPU node

            result = check_parity(src, ckpt, text=parity_text, device=parity_device)
    return Report(Path(output), len(wanted), bar.bytes, time.perf_counter() - t0, result)
