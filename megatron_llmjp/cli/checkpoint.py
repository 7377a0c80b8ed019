"""``llmjp-checkpoint``: look at a checkpoint without loading it.

Examples::

    llmjp-checkpoint info runs/quickstart/checkpoints          # the latest one
    llmjp-checkpoint info runs/quickstart/checkpoints/iter_0000020 --json
    llmjp-checkpoint verify runs/quickstart/checkpoints        # exit 0 if intact, else 2
    llmjp-checkpoint info megatron-lm/run --model-overrides    # Megatron-LM: model.* for a config

Reads only ``latest`` and ``manifest.json`` and checks file sizes; neither torch nor
megatron-core is imported, so it runs on a login node. A Megatron-LM checkpoint (root with
``latest_checkpointed_iteration.txt``) has no manifest: its description is derived from
``common.pt``'s args (read with torch's restricted ``weights_only`` unpickler) and ``verify``
checks every shard byte range that ``.metadata`` lists.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import describe_checkpoint
from megatron_llmjp.config.loader import ConfigError

PROG = "llmjp-checkpoint"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ")[1])
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="summarise a checkpoint (root: its latest)")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.add_argument(
        "--model-overrides",
        action="store_true",
        help="Megatron-LM checkpoint: print its model as --set model.*=... lines",
    )
    verify = sub.add_parser("verify", help="check that every file is present and complete")
    verify.add_argument("path")
    for s in (info, verify):
        s.add_argument(
            "--vocab-size", type=int, help="true vocabulary (Megatron-LM args may lack it)"
        )
        s.add_argument("--tokenizer", help="tokenizer whose size is the true vocabulary")
    return p


def _summary(directory, manifest: dict) -> str:
    m, par = manifest["model"], manifest["parallel"]
    size = sum(manifest["files"].values())
    lines = [
        f"checkpoint   {directory}",
        f"iteration    {manifest['iteration']} (consumed samples "
        f"{manifest.get('consumed_samples')}, skipped steps {manifest.get('skipped_steps')})",
        f"model        {m['name']} ({m['family']}, exports as {m['hf_architecture']}): "
        f"{m['num_layers']} layers, hidden {m['hidden_size']}, heads {m['num_attention_heads']}"
        f"/{m['num_query_groups']} x {m['head_dim']}, vocab {m['vocab_size']} "
        f"(padded {m['padded_vocab_size']})",
    ]
    if m.get("moe"):
        moe = m["moe"]
        lines.append(
            f"experts      {moe['num_experts']} x ffn {moe['moe_ffn_hidden_size']}, "
            f"top-{moe['router_topk']} ({moe['experts_layout']})"
        )
    opt = manifest["optimizer"]
    form = ""
    if opt["saved"] and manifest.get("format") == "megatron-lm":
        chained = f", {'/'.join(opt['chained'])}" if opt.get("chained") else ""
        form = f", {'distributed ' if opt['distributed'] else ''}{opt['sharding']}{chained}"
    lines += [
        "layout       " + " ".join(f"{k}={par[k]}" for k in par) + " (at save time)",
        f"optimizer    {'saved' if opt['saved'] else 'not saved'}"
        f" ({manifest['precision']['params_dtype']} params{form})",
        f"size         {size / 2**20:.1f} MiB in {len(manifest['files'])} files",
        "versions     " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items() if v),
    ]
    if manifest.get("format") == "megatron-lm":
        src = manifest["source"]
        lines.append(
            f"source       written by Megatron-LM; model from {src['model']}; vocabulary from "
            f"{src['vocab_size']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        directory = store.resolve(args.path, "path")
        manifest = describe_checkpoint(
            directory,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            require_vocab=args.command == "info" and args.model_overrides,
        )
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.command == "verify":
        mlm = manifest.get("format") == "megatron-lm"
        print(
            f"{directory}: {len(manifest['files'])} files intact"
            + (
                f" (Megatron-LM checkpoint, iteration {manifest['iteration']}, every shard "
                "byte range listed in .metadata present)"
                if mlm
                else ""
            )
        )
    elif args.model_overrides:
        if manifest.get("format") != "megatron-lm":
            print(
                f"{PROG}: error: --model-overrides: {directory} has a manifest and a "
                "config.yaml (use that config)",
                file=sys.stderr,
            )
            return 2
        from megatron_llmjp.checkpoint.megatron_lm import model_overrides

        print("\n".join(model_overrides(manifest)))
    elif args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(_summary(directory, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
