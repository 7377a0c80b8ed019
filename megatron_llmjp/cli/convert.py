"""``llmjp-convert``: training checkpoints <-> Hugging Face model directories, on CPU.

Examples::

    llmjp-convert mcore-to-hf --input runs/8b/checkpoints --output release/llm-jp-4-8b \\
        --tokenizer ../shared/data/tokenizer/llm-jp-tokenizer-v4.0 --dtype bf16
    llmjp-convert hf-to-mcore --input release/llm-jp-4-8b --output runs/cpt/init \\
        --set parallel.tp=2 --set parallel.pp=2
    llmjp-convert hf-to-gguf --input release/llm-jp-4-8b --output llm-jp-4-8b-bf16.gguf

Any TP/PP/VPP/EP layout is read (tensors are stored globally), from this package's checkpoints
or Megatron-LM's own torch_dist ones (model derived from ``common.pt``'s args; the true
vocabulary from them, ``--vocab-size`` or ``--tokenizer``); the output of ``hf-to-mcore``
loads into any layout with ``checkpoint.load=OUTPUT checkpoint.load_optimizer=false``. Both
directions stream layer by layer and write under a temporary name; before renaming it into
place, the parity check runs megatron-core and transformers side by side on real text, also
layer by layer (about one layer of each model in memory, so it scales to LLM-jp-4-332B-A31B),
comparing the hidden states after every layer and the logits at the end, and names the first
layer that disagrees. It runs in FP32 on CPU (``--parity-device cuda`` to use a GPU); with
``--tokenizer`` it starts from text through the shipped tokenizer.
Exit status: 0 done, 2 bad input (nothing written), 3 parity check failed, the shipped
tokenizer included (nothing written).
"""

from __future__ import annotations

import argparse
import gc
import sys
from types import ModuleType

from megatron_llmjp.cli import add_overrides, doc_parser
from megatron_llmjp.config.loader import ConfigError

PROG = "llmjp-convert"
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # torch dtype names


def import_driver() -> ModuleType:
    """The conversion driver, imported (with torch and torch's checkpoint package, which its
    readers and writers use) while the cyclic garbage collector is off. These imports create
    about 250,000 objects that live as long as the process and set off about 600 collections
    that find no garbage: measured on the 2-core VM (``gc.callbacks``), 0.29 s of a 1.6 s
    import at low load and 0.47-0.71 s of 2.7-3.4 s under load; the start-up of five
    alternated runs went from a median of 2.59 s to 2.43 s. The collector is restored
    afterwards, so the conversion itself runs with it (its own collections took 0.16 s of
    ``mcore-to-hf`` on the 2 GB benchmark model)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch.distributed.checkpoint  # noqa: F401

        from megatron_llmjp.convert import driver
    finally:
        if enabled:
            gc.enable()
    return driver


def _parser() -> argparse.ArgumentParser:
    p = doc_parser(PROG, __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("mcore-to-hf", "export a training checkpoint as a Hugging Face model directory"),
        ("hf-to-mcore", "import a Hugging Face model directory as a training checkpoint"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--input", required=True)
        s.add_argument("--output", required=True)
        s.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: input's)")
        s.add_argument(
            "--skip-parity", action="store_true", help="skip the check against the source model"
        )
        s.add_argument(
            "--parity-device",
            default="cpu",
            help="device of the parity check: cpu (default, also on a GPU node) or cuda[:N]",
        )
        s.add_argument("--force", action="store_true", help="replace an existing --output")
        s.add_argument("--no-progress", action="store_true")
        if name == "mcore-to-hf":
            s.add_argument(
                "--tokenizer",
                help="tokenizer folder (SentencePiece *.model and/or tokenizer.json): the "
                "release's tokenizer files, token ids and generation stop ids come from it",
            )
            s.add_argument(
                "--vocab-size",
                type=int,
                help="true vocabulary of a Megatron-LM checkpoint whose args lack it "
                "(default: --tokenizer's size)",
            )
            s.add_argument("--max-shard-size", default="5GB", help="per safetensors file")
        else:
            add_overrides(s, "target run config, e.g. parallel.tp=2 (model.* comes from HF)")
    g = sub.add_parser("hf-to-gguf", help="write a GGUF file for llama.cpp from an HF export")
    g.add_argument("--input", required=True, help="HF export directory (mcore-to-hf output)")
    g.add_argument("--output", required=True, help="GGUF file to write")
    g.add_argument(
        "--outtype",
        choices=["auto", "f32", "f16", "bf16"],
        default="auto",
        help="matrix type (default: the export's dtype); norms and the MoE router stay F32",
    )
    g.add_argument("--force", action="store_true", help="replace an existing --output")
    return p


def _hf_to_gguf(args: argparse.Namespace) -> int:
    from megatron_llmjp.convert.gguf_export import hf_to_gguf

    try:
        r = hf_to_gguf(args.input, args.output, outtype=args.outtype, force=args.force)
    except ConfigError as e:
        print(f"{PROG}: error: {e}; nothing written", file=sys.stderr)
        return 2
    print(
        f"{PROG}: wrote {r.output} ({r.architecture}, {r.outtype}, {r.tensors} tensors, "
        f"{r.bytes / 1e9:.3f} GB in {r.seconds:.1f} s)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "hf-to-gguf":
        return _hf_to_gguf(args)
    driver = import_driver()
    import torch

    from megatron_llmjp.convert.safetensors_io import parse_size
    from megatron_llmjp.convert.transforms import ParityError

    if not args.skip_parity:
        from megatron_llmjp.convert.parity import parity_device

        try:
            parity_device(args.parity_device)
        except ConfigError as e:
            print(f"{PROG}: error: --parity-device: {e}", file=sys.stderr)
            return 2
    if args.skip_parity:
        print(
            f"{PROG}: warning: --skip-parity: the output is NOT checked against its source",
            file=sys.stderr,
        )
    common = dict(
        dtype=getattr(torch, DTYPES[args.dtype]) if args.dtype else None,
        parity=not args.skip_parity,
        parity_device=args.parity_device,
        force=args.force,
        progress=not args.no_progress,
    )
    try:
        if args.command == "mcore-to-hf":
            report = driver.mcore_to_hf(
                args.input,
                args.output,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                max_shard_size=parse_size(args.max_shard_size),
                **common,
            )
        else:
            report = driver.hf_to_mcore(args.input, args.output, overrides=args.overrides, **common)
    except ParityError as e:
        print(f"{PROG}: error: {e}; nothing written", file=sys.stderr)
        return 3
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    for note in report.notes or []:
        print(f"{PROG}: {note}")
    print(
        f"{PROG}: wrote {report.output} ({report.tensors} tensors, {report.bytes / 1e9:.3f} GB "
        f"in {report.seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
