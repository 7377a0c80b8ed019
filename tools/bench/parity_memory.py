"""Peak memory of the conversion parity check: streamed (layer by layer) against whole models.

Writes the random-weight Hugging Face directory of ``tools/bench/convert.py`` (an LLM-jp-4-8B
shape narrowed to about 1B parameters: hidden 2048, FFN 7168, the real 196,608 vocabulary,
4 layers by default), imports it with ``llmjp-convert hf-to-mcore --skip-parity``, then runs
each check on the same pair in a fresh process (peak RSS from GNU time, as convert.py does):

* ``check_parity(method="whole")``: megatron-core GPTModel and transformers'
  AutoModelForCausalLM loaded whole in FP32 (the baseline),
* ``check_parity(method="streamed")``: one stage of each model at a time (the default),

and prints seconds, peak RSS, the ratio streamed / whole and the logits difference of each
(they must agree). The whole-model check needs about 2 x 4 bytes x parameters of memory.

    .venv/bin/python tools/bench/parity_memory.py [--layers 4] [--hidden 2048] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert import _model, size_of, timed, write_random_hf  # noqa: E402

CHECK = """
import json, sys
from megatron_llmjp.convert.parity import check_parity
r = check_parity(sys.argv[1], sys.argv[2], method=sys.argv[3])
json.dump({k: r[k] for k in ("max_abs_diff", "rel_diff", "top1_agreement", "passed")},
          open(sys.argv[4], "w"))
"""


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=7168)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llmjp-bench-parity-", dir=args.workdir))
    try:
        model = _model(args)
        params = write_random_hf(root / "hf", model, torch.bfloat16)
        gb = size_of(root / "hf") / 1e9
        print(f"model: {params / 1e9:.3f} B parameters, {gb:.2f} GB in bf16", flush=True)
        subprocess.run(
            [sys.executable, "-m", "megatron_llmjp.cli.convert", "hf-to-mcore", "--input",
             str(root / "hf"), "--output", str(root / "mc"), "--skip-parity", "--no-progress"],
            check=True, cwd=REPO,
        )  # fmt: skip
        ckpt = root / "mc" / "iter_0000000"
        rows = {}
        for method in ("whole", "streamed"):
            out = root / f"{method}.json"
            cmd = [sys.executable, "-c", CHECK, str(root / "hf"), str(ckpt), method, str(out)]
            seconds, rss = timed(cmd)
            rows[method] = (seconds, rss, json.loads(out.read_text()))
        idle = timed([sys.executable, "-c", "import megatron_llmjp.convert.parity, transformers"])
        fp32 = params * 4 / 1e9
        print(f"\n{'check':<10}{'seconds':>9}{'peak RSS GB':>13}{'max |dlogit|':>14}{'passed':>8}")
        for method, (seconds, rss, fig) in rows.items():
            print(
                f"{method:<10}{seconds:>9.1f}{rss:>13.2f}{fig['max_abs_diff']:>14.3g}"
                f"{fig['passed']!s:>8}"
            )
        print(
            f"(python + imports alone: peak RSS {idle[1]:.2f} GB; one model in FP32: {fp32:.2f} GB)"
        )
        whole, streamed = rows["whole"], rows["streamed"]
        print(
            f"\nstreamed / whole: peak RSS {streamed[1] / whole[1]:.1%}, time "
            f"{streamed[0] / whole[0]:.2f}x; |max |dlogit| streamed - whole| = "
            f"{abs(streamed[2]['max_abs_diff'] - whole[2]['max_abs_diff']):.2g}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
