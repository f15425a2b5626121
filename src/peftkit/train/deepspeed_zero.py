"""DeepSpeed ZeRO stage 1/2 under the loop: its config from TrainConfig, and optimizer state
as whole per-parameter tensors.

Under `accelerate launch --use_deepspeed` the DeepSpeed engine owns the optimizer step: it
keeps fp32 master weights and Adam moments partitioned over the processes (flat buffers, not
per parameter), clips, and steps at the end of each accumulation window. The loop keeps its
own checkpoint format by gathering each trainable parameter's moments whole
(`deepspeed.utils.safe_get_full_optimizer_state`) and writing them back the same way, so a
DeepSpeed checkpoint holds the same tensors as a single-process one. Stage 3 (parameters
partitioned too) is refused: the adapter could not be saved without gathering every layer.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .config import TrainConfig

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def is_deepspeed(accelerator: Any) -> bool:
    return getattr(accelerator.distributed_type, "name", "") == "DEEPSPEED"


def configure(accelerator: Any, config: TrainConfig) -> None:
    """Fill the DeepSpeed config from `config` (micro batch, accumulation, clipping): the loop
    forms the windows, so TrainConfig wins; a value the DeepSpeed config sets differently
    (e.g. `accelerate config`'s gradient_accumulation_steps: 1) is overridden with a warning."""
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.zero_stage
    if stage not in (0, 1, 2):
        raise NotImplementedError(
            f"peftkit.train runs DeepSpeed ZeRO stage 1 or 2, got zero_stage={stage}: stage 3 partitions the "
            "parameters too, and the adapter could not be saved without gathering every layer. Use stage 2, or FSDP2"
        )
    wanted = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": float(config.max_grad_norm or 0.0),  # 0: DeepSpeed does not clip
    }
    ds_config = plugin.deepspeed_config
    conflicts = [f"{key}: DeepSpeed config {ds_config[key]!r}, TrainConfig {value!r}" for key, value in wanted.items()
                 if ds_config.get(key, "auto") not in ("auto", value)]
    if conflicts:
        warnings.warn("the DeepSpeed config differs from the TrainConfig, which the loop follows:\n  "
                      + "\n  ".join(conflicts), stacklevel=3)
    ds_config.update(wanted)
    ds_config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x processes


def gather_moments(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Whole Adam moments of every trainable parameter, keyed "state.{i}.{key}" as
    `optimizer.state_dict()` numbers them on one process, and the parameter names in that
    order. Collective: every process must call it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    names, tensors = [], {}
    step = _step(optimizer)
    for index, (name, param) in enumerate(param_order(model, optimizer)):
        names.append(name)
        for key in MOMENT_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is not None:
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
        if step is not None:
            tensors[f"state.{index}.step"] = step.detach().cpu().clone()
    return tensors, names


def restore_moments(model: torch.nn.Module, optimizer: Any, tensors: dict[str, torch.Tensor]) -> None:
    """`gather_moments` undone: each process keeps its partition of every moment and the step."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _create_optimizer_state(optimizer)

    for index, (_, param) in enumerate(param_order(model, optimizer)):
        for key in MOMENT_KEYS:
            if f"state.{index}.{key}" in tensors:
                safe_set_full_optimizer_state(param, tensors[f"state.{index}.{key}"], key)
    step = tensors.get("state.0.step")
    if step is not None:
        for state in _inner_optimizer(optimizer).state.values():
            state["step"] = step.clone().to(state["step"].device) if torch.is_tensor(state.get("step")) else step.item()


def param_order(model: torch.nn.Module, optimizer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in the order of the optimizer's groups as built (ZeRO keeps them in
    `bit16_groups`), which is how a single process's `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    zero = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    groups = getattr(zero, "bit16_groups", None)
    if groups is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(names[id(p)], p) for group in groups for p in group]


def set_master_weights(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Write whole trainable weights into DeepSpeed's fp32 master partitions too (the next
    step would otherwise copy the old masters back over them)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, param in model.named_parameters():
        if param.requires_grad:
            safe_set_full_fp32_param(param, values[name].to(torch.float32))


def _create_optimizer_state(optimizer: Any) -> None:
    """Give the torch optimizer its (zero) state for ZeRO's flat fp32 partitions, as its first
    step would, and link each parameter to its fragments: a resumed run has not stepped yet,
    and DeepSpeed sets moments only into existing state."""
    zero = getattr(optimizer, "optimizer", optimizer)
    partitions = getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO 1/2
    partitions = partitions or getattr(zero, "fp32_groups_flat_partition", None)  # bf16 with ZeRO 1
    if partitions is None or not hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        raise NotImplementedError(
            f"resuming under DeepSpeed needs its ZeRO 1/2 optimizer; got {type(zero).__name__}, whose optimizer "
            "state layout peftkit does not know"
        )
    inner = _inner_optimizer(optimizer)
    for flat in partitions:
        state = inner.state[flat]
        if not state:
            state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper and DeepSpeed's ZeRO optimizer."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's DeepSpeedOptimizerWrapper
    return getattr(inner, "optimizer", inner)  # DeepSpeed's ZeRO optimizer


def _step(optimizer: Any) -> torch.Tensor | None:
    for state in _inner_optimizer(optimizer).state.values():
        step = state.get("step")
        if step is not None:
            return step if torch.is_tensor(step) else torch.tensor(float(step))
    return None
