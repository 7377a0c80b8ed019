"""The structure key that decides whether a save may reuse megatron-core's cached save plan."""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from megatron_llmjp.checkpoint.state import _structure


def _sd(rows: int = 4, key: str = "w", offset: int = 0, dtype=torch.float32, replica: int = 0):
    return {
        "model": {
            key: ShardedTensor.from_rank_offsets(
                key, torch.zeros(rows, 3, dtype=dtype), (0, offset, 2), replica_id=replica
            )
        },
        "rng": ShardedObject("rng", {"seed": 1}, (2,), (0,), replica_id=0),
        "progress": {"iteration": 5},
    }


def test_same_structure_with_other_values_keeps_the_key():
    a, b = _sd(), _sd()
    b["model"]["w"].data.fill_(7.0)
    b["rng"].data = {"seed": 2}
    b["progress"]["iteration"] = 6  # common (non-sharded) values are not part of the plan
    assert _structure(a) == _structure(b)
    # The global shape megatron-core derives from the rank offsets: 2 shards of 4 rows.
    assert _structure(a)[0][2] == (8, 3)


def test_any_change_megatron_core_plans_by_changes_the_key():
    base = _structure(_sd())
    assert _structure(_sd(rows=5)) != base  # local shape (and global shape)
    assert _structure(_sd(key="v")) != base  # key
    assert _structure(_sd(offset=1)) != base  # position of this rank's shard
    assert _structure(_sd(dtype=torch.bfloat16)) != base  # dtype
    assert _structure(_sd(replica=1)) != base  # which rank writes it
    with_optimizer = _sd()
    with_optimizer["optimizer"] = {
        "exp_avg": ShardedTensor.from_rank_offsets("exp_avg", torch.zeros(2), replica_id=0)
    }
    assert _structure(with_optimizer) != base  # the first save with optimizer state
