"""``llmjp-preprocess``: JSONL corpora -> a megatron-core indexed dataset (``PREFIX.bin/.idx``).

Examples::

    llmjp-preprocess --input ja.jsonl.gz en.jsonl.zst --output-prefix data/mix_text_document \\
        --tokenizer ../shared/data/tokenizer/llm-jp-tokenizer-v4.0
    llmjp-preprocess --input crawl.jsonl --output-prefix data/crawl --tokenizer hf_dir/ \\
        --text-key content --workers 16 --skip-malformed

Each line's text is encoded without BOS/EOS and followed by EOD; see
``megatron_llmjp.data.preprocess`` for the full contract. Exit status: 0 done, 2 bad input or
arguments (one ``llmjp-preprocess: error: ...`` line), 130 / 143 interrupted by SIGINT /
SIGTERM. Nothing is left under the output names unless the run completes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from megatron_llmjp.data.preprocess import PreprocessError, default_workers, preprocess

PROG = "llmjp-preprocess"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenise JSONL files (plain, .gz or .zst; one document per line) into a "
        "megatron-core indexed dataset PREFIX.bin/PREFIX.idx, EOD after every document.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="JSONL files, concatenated in the order given",
    )
    p.add_argument(
        "--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin/.idx"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="SentencePiece .model, Hugging Face tokenizer.json, or a directory holding one",
    )
    p.add_argument(
        "--tokenizer-backend",
        choices=("auto", "sentencepiece", "hf"),
        default="auto",
        help="force a backend when a directory holds both kinds (default: auto)",
    )
    p.add_argument("--text-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="tokenising processes; 1 runs in this process (default: usable CPUs, "
        f"{default_workers()} here)",
    )
    p.add_argument(
        "--skip-malformed",
        action="store_true",
        help="skip and count malformed lines instead of stopping at the first one",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's kill), unwound like Ctrl-C so temporary files are removed."""


def _sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): return instead of exiting
        return int(e.code or 0)
    from megatron_llmjp.data.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_path(args.tokenizer, backend=args.tokenizer_backend)
    except (FileNotFoundError, ValueError, ImportError) as e:
        return _error(str(e))
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _sigterm) if in_main_thread else None
    try:
        summary = preprocess(
            args.input,
            args.output_prefix,
            tok,
            text_key=args.text_key,
            workers=args.workers,
            skip_malformed=args.skip_malformed,
            overwrite=args.overwrite,
            progress=None if args.no_progress else sys.stderr,
        )
    except PreprocessError as e:
        return _error(str(e))
    except KeyboardInterrupt as e:
        print(f"{PROG}: interrupted; no output written", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    for example in summary.malformed_examples:
        print(f"{PROG}: skipped {example}", file=sys.stderr)
    if summary.malformed_lines > len(summary.malformed_examples):
        more = summary.malformed_lines - len(summary.malformed_examples)
        print(f"{PROG}: ... and {more:,} more malformed line(s)", file=sys.stderr)
    print(f"{PROG}: {summary.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
