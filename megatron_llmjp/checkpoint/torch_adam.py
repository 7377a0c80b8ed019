"""Loading distributed-optimizer checkpoints when megatron-core falls back to ``torch.optim.Adam``.

Without Transformer Engine or apex (CPU machines), megatron-core 0.16.1 wraps torch's Adam,
whose per-parameter ``step`` state its checkpoint code only half handles:

1. a freshly built optimizer has no state, so building the loading state dict fails: give every
   parameter zeroed moments and a zero step first (``prepare_for_load``);
2. ``_set_main_param_and_optimizer_states`` copies every state key, ``step`` included, which the
   loaded tensors do not carry (``KeyError: 'step'``) or, in the ``dp_reshardable`` form, carry
   as this rank's stale pre-load value (a non-persistent entry) that would overwrite the step
   ``DistributedOptimizer.load_state_dict`` has just set from the saved parameter groups; and it
   copies into the main parameters (leaf views that require grad) outside ``no_grad``: a
   narrower copy that leaves ``step`` alone is installed;
3. after loading, one ``step`` tensor is shared by all parameters and torch's Adam increments it
   once per parameter per step (wrong bias correction): each state gets its own copy
   (``after_load``).

With Transformer Engine or apex (GPU containers) none of this applies and nothing is changed.
"""

from __future__ import annotations

import torch


def _using_torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _distributed(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _install_copy_fix() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(original, "_llmjp_fixed", False):
        return

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        with torch.no_grad():
            main_param.copy_(tensors["param"])
            for key, value in state.items():
                if key in tensors and key != "step":
                    value.copy_(tensors[key])
        return None

    set_states._llmjp_fixed = True
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def prepare_for_load(optimizer) -> None:
    if not _using_torch_adam():
        return
    _install_copy_fix()
    for opt in _distributed(optimizer):
        inner = opt.optimizer
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].setdefault("step", torch.zeros((), dtype=torch.float32))


def after_load(optimizer) -> None:
    if not _using_torch_adam():
        return
    for opt in _distributed(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()
