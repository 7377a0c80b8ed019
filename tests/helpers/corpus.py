"""Small megatron indexed datasets from the shared corpus, for mixture and training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "corpus"
TOKENIZER = CORPUS.parent / "tokenizer" / "llm-jp-tokenizer-v4.0"
FILES = {
    "ja": "ja-jnli-v1.1-train.txt",
    "en": "en-tinyshakespeare.txt",
    "qa": "ja-jcommonsenseqa-v1.1-train.txt",
}


def build_sources(out: Path, max_bytes: int = 60_000) -> dict[str, str]:
    """One indexed dataset per corpus file (documents = lines, EOD appended); name -> prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_llmjp.data.tokenizer import Tokenizer

    tok = Tokenizer.from_path(TOKENIZER)
    out.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for name, file in FILES.items():
        text = (CORPUS / file).read_text(encoding="utf-8")[:max_bytes]
        docs = [line for line in text.splitlines() if line.strip()]
        prefix = str(out / name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        for ids in tok.encode_batch(docs):
            builder.add_document([*ids, tok.eod_id], [len(ids) + 1])
        builder.finalize(prefix + ".idx")
        prefixes[name] = prefix
    return prefixes


def write_mixture(path: Path, prefixes: dict[str, str], stages: str) -> Path:
    """A mixture file with the given sources and a YAML ``stages:`` body."""
    lines = ["sources:"] + [f"  {k}: {v}" for k, v in prefixes.items()] + ["stages:", stages]
    path.write_text("\n".join(lines) + "\n")
    return path
