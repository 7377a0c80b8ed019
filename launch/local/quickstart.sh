#!/usr/bin/env bash
# The main job: set up (once), then train a tiny LLM-jp-4-shaped MoE model on CPU with 4 gloo
# processes (TP2 x PP2 x EP2) on the bundled Japanese/English/code mixture. Extra arguments are
# passed to llmjp-train, e.g. --set train.iters=100 or --output-dir runs/mine (a new run:
# its checkpoints go to runs/mine/checkpoints, never to runs/quickstart's).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash launch/local/setup_cpu.sh
.venv/bin/python tools/data/quickstart_corpus.py    # indexed datasets; skipped when up to date
OMP_NUM_THREADS=1 exec .venv/bin/torchrun --nproc-per-node 4 \
  -m megatron_llmjp.cli.train --config configs/quickstart.yaml "$@"
