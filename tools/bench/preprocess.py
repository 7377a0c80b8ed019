"""Preprocessing throughput (tokens/s) against a plain single-process baseline, in one run.

The input is JSONL built from the shared corpus (Japanese JGLUE + English tinyshakespeare, one
document per non-empty line, or ``--lines-per-doc`` consecutive lines joined with newlines),
repeated ``--repeat`` times. The baseline is the obvious loop: ``json.loads`` each line,
``SentencePieceProcessor.encode`` the text, append EOD and ``IndexedDatasetBuilder.add_document``.
Each method runs ``--trials`` times, interleaved so machine load hits all of them alike; best and
median trials are reported (the best is the least disturbed by other work on a shared machine).
Every output must be byte-identical to the baseline's ``.bin`` and ``.idx``. Timings cover
tokenizer loading, worker start-up and writing, not Python imports.

    .venv/bin/python tools/bench/preprocess.py [--repeat 4] [--trials 5] [--lines-per-doc 1]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizer" / "llm-jp-tokenizer-v4.0"
CORPUS = SHARED / "corpus"


def build_jsonl(out: Path, repeat: int, lines_per_doc: int) -> tuple[int, int]:
    """Write the corpus as JSONL; returns (documents, bytes)."""
    docs: list[str] = []
    for f in sorted(CORPUS.glob("*.txt")):
        lines = [ln for ln in f.read_text(encoding="utf-8").split("\n") if ln.strip()]
        docs += [
            "\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)
        ]
    body = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            f.write(body)
    return len(docs) * repeat, out.stat().st_size


def baseline(jsonl: Path, prefix: Path) -> tuple[float, int]:
    """Single process: sp.encode per document, IndexedDatasetBuilder.add_document."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(next(TOKENIZER.glob("*.model"))))
    eod = 6  # LLM-jp-4 <EOD>, by id
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(sp.vocab_size()))
    tokens = 0
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"])
            if not ids:
                continue
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return time.perf_counter() - t0, tokens


def ours(jsonl: Path, prefix: Path, workers: int, block_bytes: int) -> tuple[float, int]:
    from megatron_llmjp.data.preprocess import preprocess

    s = preprocess([jsonl], prefix, TOKENIZER, workers=workers, block_bytes=block_bytes)
    return s.seconds, s.tokens


def same(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(f"{a}{ext}", f"{b}{ext}", shallow=False) for ext in (".bin", ".idx"))


def main() -> int:
    from megatron_llmjp.data.preprocess import DEFAULT_BLOCK_BYTES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=4, help="copies of the corpus in the input")
    p.add_argument("--lines-per-doc", type=int, default=1, help="corpus lines per document")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES)
    args = p.parse_args()
    if not TOKENIZER.is_dir():
        print(f"shared data not found at {SHARED}", file=sys.stderr)
        return 2
    # Import megatron-core before timing anything: its torch import takes seconds.
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        jsonl = tmpd / "corpus.jsonl"
        n_docs, n_bytes = build_jsonl(jsonl, args.repeat, args.lines_per_doc)
        cores = len(os.sched_getaffinity(0))
        print(
            f"input: {n_docs:,} documents, {n_bytes / 1e6:.1f} MB JSONL "
            f"(corpus x{args.repeat}, {args.lines_per_doc} line(s)/doc); {cores} cores, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        methods = {"baseline": lambda out: baseline(jsonl, out)}
        for w in args.workers:
            methods[f"preprocess workers={w}"] = lambda out, w=w: ours(
                jsonl, out, w, args.block_bytes
            )
        times: dict[str, list[float]] = {m: [] for m in methods}
        tokens: dict[str, int] = {}
        for trial in range(args.trials):
            for i, (name, fn) in enumerate(methods.items()):
                out = tmpd / f"m{i}_t{trial}"
                seconds, tokens[name] = fn(out)
                times[name].append(seconds)
                if not same(out, tmpd / "m0_t0"):
                    print(f"{name}: output differs from the baseline", file=sys.stderr)
                    return 1
                for ext in (".bin", ".idx"):
                    if trial or i:  # keep the first baseline output for the comparisons
                        os.remove(f"{out}{ext}")

    base, base_med = min(times["baseline"]), statistics.median(times["baseline"])
    print(
        f"{'method':<24}{'best s':>8}{'tokens/s':>12}{'vs base':>9}"
        f"{'median s':>10}{'vs base':>9}   trials (s)"
    )
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        trials = " ".join(f"{t:.2f}" for t in ts)
        print(
            f"{name:<24}{best:>8.2f}{tokens[name] / best:>12,.0f}{base / best:>8.2f}x"
            f"{med:>10.2f}{base_med / med:>8.2f}x   {trials}"
        )
    print(f"tokens (EOD included): {tokens['baseline']:,}; outputs byte-identical to baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
