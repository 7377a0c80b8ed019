"""Megatron-LM's own training run, reproduced by ``llmjp-train``.

``../shared/data/megatron-lm/train-reference/`` holds a run of Megatron-LM's unmodified
``pretrain_gpt.py`` (llm-jp fork, megatron-core 0.12.1; FP32, CPU, one process): its initial
checkpoint, its indexed dataset, and every value of its 10 iterations (losses, gradient norms,
applied learning rates, the consumed micro-batches, the weights after training). The trainer
starts from the same checkpoint with the same hyperparameters and the same megatron-core
``GPTDataset`` settings, and must reproduce:

- the data: the 40 micro-batches, token for token, and megatron-core's index files;
- per iteration: the lm loss (|diff| <= 1e-6), the gradient norm before clipping (1e-6 relative),
  the applied learning rate (1e-12 relative);
- the weights after 10 iterations (max |diff| <= 1e-6).

These bounds are the reference's own suggestion for FP32 on CPU; the measured differences are
printed by the test. The semantics this pins down (per-group weight decay, warmup from lr 0,
the sample-based schedule, loss averaging, no EOD masking) are listed in the reference README.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed


def _reference(shared_data: Path) -> Path:
    ref = shared_data / "megatron-lm" / "train-reference"
    if not (ref / "losses.json").is_file():
        pytest.skip(f"{ref} not found")
    return ref


def _overrides(ref: Path, out_dir: Path) -> list[str]:
    """The reference run's arguments (train-reference/command.txt) as llmjp-train settings."""
    mixture = out_dir / "mixture.yaml"
    mixture.write_text(
        "sources:\n"
        f"  synth: {ref / 'data' / 'synth1000_text_document'}\n"
        "stages:\n"
        "  pretrain:\n"
        "    mix: {synth: {weight: 1.0}}\n"
    )
    args = json.loads((ref / "args.json").read_text())
    return [
        "model.name=llm-jp-4-tiny-dense",
        f"model.num_layers={args['num_layers']}",
        f"model.hidden_size={args['hidden_size']}",
        f"model.ffn_hidden_size={args['ffn_hidden_size']}",
        f"model.num_attention_heads={args['num_attention_heads']}",
        f"model.num_query_groups={args['num_query_groups']}",
        f"model.kv_channels={args['kv_channels']}",
        f"model.vocab_size={args['vocab_size'] + 1}",  # NullTokenizer: ids 0..999 and EOD 1000
        f"model.make_vocab_size_divisible_by={args['make_vocab_size_divisible_by']}",
        f"model.rotary_base={args['rotary_base']}",
        f"model.norm_epsilon={args['norm_epsilon']}",
        "model.tie_word_embeddings=false",
        f"model.max_position_embeddings={args['max_position_embeddings']}",
        f"train.iters={args['train_iters']}",
        f"train.seq_length={args['seq_length']}",
        f"train.micro_batch_size={args['micro_batch_size']}",
        f"train.global_batch_size={args['global_batch_size']}",
        f"train.seed={args['seed']}",
        f"optim.lr={args['lr']}",
        f"optim.min_lr={args['min_lr']}",
        f"optim.weight_decay={args['weight_decay']}",
        f"optim.adam_beta1={args['adam_beta1']}",
        f"optim.adam_beta2={args['adam_beta2']}",
        f"optim.adam_eps={args['adam_eps']}",
        f"optim.clip_grad={args['clip_grad']}",
        "optim.use_distributed_optimizer=false",
        f"schedule.style={args['lr_decay_style']}",
        f"schedule.warmup_iters={args['lr_warmup_iters']}",
        f"schedule.decay_iters={args['lr_decay_iters']}",
        f"data.mixture={mixture}",
        f"data.split={args['split']}",
        f"data.null_tokenizer_vocab_size={args['vocab_size']}",
        f"data.cache_dir={out_dir / 'cache'}",
        "precision.dtype=fp32",
        "logging.tensorboard=false",
        f"output_dir={out_dir / 'run'}",
    ]


def _microbatches(overrides: list[str]) -> list[dict]:
    from megatron_llmjp.data.sampler import build_data

    cfg = build_config(overrides=overrides)
    torch.distributed.init_process_group("gloo")  # megatron-core's dataset builder asks
    try:
        data = build_data(cfg, dp_rank=0, dp_size=1)
        return [
            {k: mb[k].tolist() for k in ("tokens", "labels", "loss_mask", "position_ids")}
            for step in range(cfg.train.iters)
            for mb in data.train.microbatches(step)
        ]
    finally:
        torch.distributed.destroy_process_group()


def test_data_order_matches_megatron_lm(shared_data, tmp_path):
    ref = _reference(shared_data)
    got = spawn(_microbatches, 1, _overrides(ref, tmp_path))[0]
    expected = json.loads((ref / "batches.json").read_text())["microbatches"]
    assert len(got) == len(expected) == 40
    for g, e in zip(got, expected, strict=True):
        where = f"iteration {e['iteration']} micro-batch {e['microbatch']}"
        assert g["tokens"] == [e["tokens"]], where
        assert g["labels"] == [e["labels"]], where
        assert sum(g["loss_mask"][0]) == e["loss_mask_sum"] == 64, where  # nothing masked
        assert g["position_ids"] == [list(range(64))], where
    # megatron-core wrote the same index files as Megatron-LM's run did
    reference_index = ref / "data" / "gptdataset_index"
    for name in ("document_index", "sample_index", "shuffle_index"):
        (ours,) = sorted((tmp_path / "cache").glob(f"*-GPTDataset-train-{name}.npy"))
        theirs = np.load(reference_index / f"{name}.npy")
        np.testing.assert_array_equal(np.load(ours), theirs, err_msg=name)
