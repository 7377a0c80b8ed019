"""Build the quickstart's indexed datasets from ``../shared/data/corpus`` and this repository.

Three sources, each a megatron indexed dataset made by ``llmjp-preprocess``'s library with the
LLM-jp-4 tokenizer:

- ``ja``: the JGLUE training texts (JNLI, JSTS, JCommonsenseQA), one document per line;
- ``en``: tiny Shakespeare, one document per speech (blank-line separated);
- ``code``: the Python source of ``megatron_llmjp/`` and ``tools/``, one document per file.

    .venv/bin/python tools/data/quickstart_corpus.py [--out runs/data/quickstart] [--workers 2]

Up-to-date outputs (same inputs, same sizes) are left alone, so the quickstart can call this
every time. ``configs/mixtures/quickstart.yaml`` samples from the default output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
JA_FILES = ("ja-jnli-v1.1-train.txt", "ja-jsts-v1.1-train.txt", "ja-jcommonsenseqa-v1.1-train.txt")
EN_FILES = ("en-tinyshakespeare.txt",)


def documents(source: str, corpus: Path) -> tuple[list[Path], list[str]]:
    """(input files, documents) of one source."""
    if source == "code":
        files = sorted([*REPO.glob("megatron_llmjp/**/*.py"), *REPO.glob("tools/**/*.py")])
        return files, [f.read_text(encoding="utf-8") for f in files]
    names = JA_FILES if source == "ja" else EN_FILES
    files = [corpus / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: the shared data must sit next to the repo")
    docs: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        parts = text.split("\n\n") if source == "en" else text.splitlines()
        docs += [p.strip() for p in parts if p.strip()]
    return files, docs


ENCODING = "literal-special-text"
"""How documents are encoded (part of the fingerprint): datasets written before special-token
text was encoded literally are rebuilt."""


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256(ENCODING.encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def build(out: Path, tokenizer: Path, corpus: Path, workers: int) -> dict[str, str]:
    from megatron_llmjp.data.preprocess import preprocess

    out.mkdir(parents=True, exist_ok=True)
    prefixes = {}
    for source in ("ja", "en", "code"):
        files, docs = documents(source, corpus)
        prefix = out / source
        stamp = out / f"{source}.stamp"
        key = _fingerprint([*files, *tokenizer.glob("*.model")])
        prefixes[source] = str(prefix)
        fresh = all(Path(str(prefix) + e).is_file() for e in (".bin", ".idx"))
        if fresh and stamp.is_file() and stamp.read_text().strip() == key:
            print(f"{source}: up to date ({prefix}.bin)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            jsonl = Path(tmp) / f"{source}.jsonl"
            with open(jsonl, "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            summary = preprocess([jsonl], prefix, tokenizer, workers=workers, overwrite=True)
        stamp.write_text(key + "\n")
        print(f"{source}: {summary.format()}")
    return prefixes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/data/quickstart", help="output directory")
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizer" / "llm-jp-tokenizer-v4.0"))
    p.add_argument("--corpus", default=str(SHARED / "corpus"))
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        build(Path(args.out), Path(args.tokenizer), Path(args.corpus), args.workers)
    except FileNotFoundError as e:
        print(f"quickstart_corpus: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
