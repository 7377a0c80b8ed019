"""``make_layout``: derived sizes and the rules megatron-core needs, checked without groups."""

from __future__ import annotations

import pytest

from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.config.schema import ParallelConfig, TrainConfig
from megatron_llmjp.models.registry import MODELS
from megatron_llmjp.parallel.layout import Layout, LayoutError, make_layout

DENSE = MODELS["llm-jp-4-tiny-dense"]  # 4 layers, 4 heads, 2 query groups
MOE = MODELS["llm-jp-4-tiny-moe"]  # 4 layers, 4 heads, 2 query groups, 8 experts


def layout(world: int, model=DENSE, train: TrainConfig | None = None, **parallel) -> Layout:
    return make_layout(ParallelConfig(**parallel), model, train or TrainConfig(), world)


def test_layout_error_is_a_config_error():
    assert issubclass(LayoutError, ConfigError)


def test_dp_is_derived_world_over_tp_pp_cp():
    lay = layout(8, DENSE, tp=2, pp=2)
    assert (lay.world, lay.tp, lay.pp, lay.cp, lay.dp) == (8, 2, 2, 1, 2)
    assert layout(8, MOE, tp=2).dp == 4
    assert layout(8, DENSE, pp=2).dp == 4
    assert layout(8, DENSE, cp=2).dp == 4
    assert layout(1, DENSE).dp == 1


def test_dense_model_with_tensor_parallelism_is_accepted():
    lay = layout(8, DENSE, tp=2, pp=2)
    assert lay.dp == 2
    assert lay.sequence_parallel is True
    assert (lay.ep, lay.etp) == (1, 1)  # no experts: expert sizes stay 1


def test_expert_dp():
    # ep=2 -> etp defaults to 1; world 8, pp 1: expert dp = 8 / (2*1*1) = 4
    lay = layout(8, MOE, ep=2)
    assert (lay.ep, lay.etp, lay.dp) == (2, 1, 8)
    assert lay.expert_dp == 4
    # tp2 pp2 ep2 (the quickstart on 4 ranks): dp 1, expert dp 4 / (2*1*2) = 1
    lay = layout(4, MOE, tp=2, pp=2, ep=2)
    assert (lay.dp, lay.etp, lay.expert_dp) == (1, 1, 1)
    # ep == 1: experts are sharded like dense weights (etp == tp), expert dp == dp
    lay = layout(8, MOE, tp=2)
    assert lay.etp == 2
    assert lay.expert_dp == lay.dp == 4
    # explicit etp
    lay = layout(8, MOE, tp=2, ep=2, etp=2)
    assert lay.expert_dp == 2


def test_sequence_parallel_default_follows_tp():
    assert layout(4, DENSE, tp=2).sequence_parallel is True
    assert layout(4, MOE, tp=2).sequence_parallel is True
    assert layout(4, DENSE, tp=2, sequence_parallel=False).sequence_parallel is False
    assert layout(4, MOE, tp=1).sequence_parallel is False
    assert layout(4, DENSE, tp=1).sequence_parallel is False
    # explicitly on with tp == 1 has nothing to split: off
    assert layout(4, DENSE, tp=1, sequence_parallel=True).sequence_parallel is False


def test_moe_with_tp_without_sequence_parallel_is_refused():
    with pytest.raises(LayoutError, match=r"parallel\.sequence_parallel=false"):
        layout(4, MOE, tp=2, sequence_parallel=False)
    # tp == 1: nothing to refuse
    assert layout(4, MOE, tp=1, sequence_parallel=False).sequence_parallel is False


@pytest.mark.parametrize("vpp", [None, 1])
def test_vpp_1_is_off(vpp):
    lay = layout(4, DENSE, pp=2, vpp=vpp)
    assert lay.vpp is None
    assert "vpp" not in lay.describe()
    # vpp=1 with pp=1 is not "vpp needs pp>=2": it is simply off
    assert layout(4, DENSE, pp=1, vpp=vpp).vpp is None


def test_vpp_on():
    lay = layout(4, DENSE, pp=2, vpp=2)  # 4 layers / (2*2): one layer per virtual stage
    assert lay.vpp == 2
    assert "vpp=2" in lay.describe()


def test_vpp_with_pp_1_is_refused():
    with pytest.raises(LayoutError, match=r"parallel\.vpp=2 needs parallel\.pp >= 2"):
        layout(4, DENSE, pp=1, vpp=2)


def test_vpp_below_1_is_refused():
    with pytest.raises(LayoutError, match=r"parallel\.vpp"):
        layout(4, DENSE, pp=2, vpp=0)


def test_interleaved_schedule_needs_microbatches_multiple_of_pp():
    # world 4, pp 2 -> dp 2; gbs 6 / (mbs 1 * dp 2) = 3 microbatches, 3 % 2 != 0
    with pytest.raises(LayoutError, match=r"interleaved schedule") as exc:
        layout(4, DENSE, TrainConfig(global_batch_size=6), pp=2, vpp=2)
    assert "(3 = " in str(exc.value) and "parallel.pp=2" in str(exc.value)
    # 4 microbatches: fine
    assert layout(4, DENSE, TrainConfig(global_batch_size=8), pp=2, vpp=2).vpp == 2
    # the same 3 microbatches without vpp are fine (1F1B has no such rule)
    assert layout(4, DENSE, TrainConfig(global_batch_size=6), pp=2).vpp is None


@pytest.mark.parametrize(("ep", "etp"), [(2, None), (1, 2)])
def test_expert_parallelism_on_dense_model_is_refused(ep, etp):
    with pytest.raises(LayoutError, match=r"needs an MoE model"):
        layout(4, DENSE, ep=ep, etp=etp)


def test_moe_etp_must_equal_tp_without_ep():
    with pytest.raises(LayoutError, match=r"parallel\.etp=1 with parallel\.ep=1"):
        layout(4, MOE, tp=2, etp=1)


@pytest.mark.parametrize("name", ["tp", "pp", "cp", "ep"])
def test_sizes_below_1_are_refused(name):
    with pytest.raises(LayoutError, match=rf"parallel\.{name} must be >= 1"):
        layout(4, DENSE, **{name: 0})


def test_global_batch_rule_uses_derived_dp():
    # world 8, pp 2 -> dp 4: gbs 8 with mbs 2 needs 8 % 8 == 0 (ok), gbs 12 does not
    assert layout(8, DENSE, TrainConfig(micro_batch_size=2, global_batch_size=8), pp=2).dp == 4
    with pytest.raises(LayoutError, match=r"2\*4 = 8"):
        layout(8, DENSE, TrainConfig(micro_batch_size=2, global_batch_size=12), pp=2)


def test_tp_may_replicate_kv_groups_when_a_multiple_of_them():
    """megatron-core replicates each KV group on tp / num_query_groups ranks."""
    assert layout(4, DENSE, tp=4).tp == 4  # 4 heads, 2 groups: each group on 2 ranks
    assert layout(4, MOE, tp=4, ep=1).tp == 4


@pytest.mark.parametrize(
    "heads,groups,tp,fragment",
    [
        (12, 3, 4, r"parallel\.tp=4 is larger than model\.num_query_groups=3 but not a multiple"),
        (12, 6, 4, r"model\.num_query_groups=6 is not divisible by parallel\.tp=4"),
    ],
)
def test_tp_and_query_groups_megatron_core_cannot_run(heads, groups, tp, fragment):
    from dataclasses import replace

    model = replace(DENSE, num_attention_heads=heads, num_query_groups=groups)
    with pytest.raises(LayoutError, match=fragment):
        layout(tp, model, tp=tp)


def test_fused_qkv_rows_must_split_over_tp():
    from dataclasses import replace

    model = replace(DENSE, num_attention_heads=4, num_query_groups=1, kv_channels=1)
    with pytest.raises(LayoutError, match=r"fused QKV .* = 6 rows are not divisible"):
        layout(4, model, tp=4)
