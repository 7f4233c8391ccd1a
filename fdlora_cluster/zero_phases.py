"""Training phases on one DeepSpeed optimizer: which adapter's parameter group trains, on every ZeRO stage.

Verified with DeepSpeed 0.19.8 (torch 2.13.0), ZeRO stages 0-3, fp32 and bf16. This is the code a
DeepSpeed upgrade must re-check: it reads DeepSpeed's private optimizer attributes, and relies on
how each stage steps. tests/test_zero_stages.py (every stage) and the ZeRO-3 cases of
tests/test_resume.py fail when one of these assumptions breaks. What it reads:

  - `.optimizer`, followed down from the engine's optimizer: DeepSpeed's wrappers (ZeRO, bf16)
    hold the torch optimizer there, whose `state` and `param_groups` hold AdamW's state.
  - ZeRO-1/2 (`stage_1_and_2.DeepSpeedZeroOptimizer`): `single_partition_of_fp32_groups[i]`, the
    flat fp32 partition the inner optimizer steps for group i (and keys its state by). After its
    first step ZeRO-1/2 links each parameter's optimizer-state fragments to these very tensors,
    which is why the state is zeroed in place, never replaced.
  - ZeRO-3 (`stage3.DeepSpeedZeroOptimizer_Stage3`): `fp32_partitioned_groups_flat[s]` (one flat
    fp32 partition per sub-group) and `sub_group_to_group_id` (sub-group -> parameter group);
    `grad_partitions_flat_buffer`, every parameter's gradient partition in one flat buffer. ZeRO-3
    puts a sub-group's partition into its group's `params` only for the duration of step().
  - Anything else (ZeRO-0, DeepSpeed's bf16 optimizer): the inner optimizer's `param_groups[i]["params"]`.

What the phases need, and why each piece exists:

  - Fresh AdamW state for the trained adapter at each phase (`reset_state`).
  - The frozen adapter left out of every inner step (`PhaseSwitch`'s step hooks): lr = 0 alone
    keeps its weights still, but AdamW would advance its step count and decay its moments.
  - ZeRO-3's stale gradient partitions cleared at a phase boundary (`clear_gradient_partitions`).
"""

from __future__ import annotations

import torch


def inner_optimizer(optimizer):
    """The torch optimizer that holds the AdamW state, under DeepSpeed's (ZeRO) wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def state_tensors(optimizer, group: int) -> list[torch.Tensor]:
    """The tensors the inner optimizer keys `group`'s state by, on every ZeRO stage.

    They are not the model's parameters under ZeRO: stage 1/2 steps one flat fp32 partition per
    group (`single_partition_of_fp32_groups[i]`, which is also what the group's `params` holds);
    stage 3 steps one flat fp32 partition per sub-group (`fp32_partitioned_groups_flat[s]`, mapped
    to its group by `sub_group_to_group_id`) and leaves every group's `params` empty outside
    step(), so reading `params` there finds nothing to reset."""
    zero = optimizer
    if hasattr(zero, "fp32_partitioned_groups_flat") and hasattr(zero, "sub_group_to_group_id"):
        return [zero.fp32_partitioned_groups_flat[s] for s, g in sorted(zero.sub_group_to_group_id.items())
                if g == group]
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return [zero.single_partition_of_fp32_groups[group]]
    return list(inner_optimizer(optimizer).param_groups[group]["params"])


def reset_state(optimizer, group: int) -> None:
    """Fresh AdamW state for `group`. Adam's state is zeroed in place (step 0, zero moments is
    exactly a fresh state) rather than dropped, because ZeRO-1/2 links each parameter's
    optimizer-state fragments to these very tensors after its first step; other optimizers'
    state is dropped and re-created lazily at their next step."""
    inner = inner_optimizer(optimizer)
    tensors = state_tensors(optimizer, group)
    if not tensors:
        raise RuntimeError(f"cannot find the optimizer state of parameter group {group} under "
                           f"{type(optimizer).__name__}; the phase's AdamW state would not restart")
    for t in tensors:
        state = inner.state.get(t)
        if not state:
            continue
        if set(state) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.zero_()
                else:
                    state[k] = 0  # a plain-number step count
        else:
            inner.state.pop(t)


def clear_gradient_partitions(optimizer) -> None:
    """Zero ZeRO-3's gradient partitions at a phase boundary. ZeRO-3 keeps every parameter's
    gradient partition in one flat buffer and reads all of them at each step, the gradient norm
    for clipping included, but overwrites a partition only when its parameter gets a gradient.
    The frozen adapter gets none, so its last phase's gradients would stay in this phase's norm
    and change its clipping: after a personal stage ZeRO-3 trained the global adapter unlike
    ZeRO-1/2 (which read a missing gradient as zeros), and unlike a job resumed into a fresh
    engine. Between steps the buffer holds nothing still needed. A no-op on other stages."""
    buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()


class PhaseSwitch:
    """Which of the optimizer's parameter groups trains: `start(name)` begins a phase of `name`.

    `groups` maps each adapter to its parameter group ({personal: 0, global: 1}). Both adapters
    stay in the one optimizer (ClientEngine says why); the one not trained is frozen by lr 0 and
    by being left out of every inner step."""

    def __init__(self, optimizer, groups: dict[str, int], lr: float):
        self.optimizer, self.groups, self.lr = optimizer, groups, lr
        self._frozen: set[int] = set()  # id() of the frozen param_group dicts
        self._hooks = None

    def start(self, name: str) -> None:
        """Train `name` only from the next step: its group's lr is `lr` and its AdamW state starts
        fresh; every other group's lr is 0 and it is left out of every optimizer step; ZeRO-3's
        stale gradient partitions are cleared."""
        self._install_freeze_hooks()
        clear_gradient_partitions(self.optimizer)
        inner = inner_optimizer(self.optimizer)
        self._frozen = set()
        for adapter, i in self.groups.items():
            group = inner.param_groups[i]
            group["lr"] = self.lr if adapter == name else 0.0
            if adapter == name:
                reset_state(self.optimizer, i)
            else:
                self._frozen.add(id(group))

    def _install_freeze_hooks(self) -> None:
        """Take the frozen groups out of every inner step. Its lr is 0, so lr alone keeps its weights
        still, but AdamW would still advance its step count (and decay its moments) each step; its
        next phase would then start from a skewed bias correction. Emptying the group's params for
        the duration of step() works on every stage: ZeRO-1/2 step one group at a time through the
        same group dicts, ZeRO-3 puts a sub-group's partition into the dict just before step().
        Installed at the first phase, on the inner optimizer as it is then."""
        if self._hooks is not None:
            return
        inner = inner_optimizer(self.optimizer)
        stash: dict[int, list] = {}

        def pre(opt, args, kwargs):
            for g in opt.param_groups:
                if id(g) in self._frozen and g["params"]:
                    stash[id(g)] = g["params"]
                    g["params"] = []

        def post(opt, args, kwargs):
            for g in opt.param_groups:
                if id(g) in stash:
                    g["params"] = stash.pop(id(g))

        self._hooks = (inner.register_step_pre_hook(pre), inner.register_step_post_hook(post))
