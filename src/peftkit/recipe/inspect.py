"""`peftkit inspect`: which modules of a model an adapter can target, and what a config selects.

Everything is computed on the meta device from the model's config.json: no weights are read,
so inspecting a 70B model takes a second.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..methods import get_method
from ..methods.base import AdapterLayer, ModulesToSaveWrapper
from ..model import get_peft_model
from ..targeting import is_conv1d
from .loading import LoadError, adapter_config, check_model_path, meta_model, model_task
from .quantization import base_memory
from .schema import ModelConfig, RunConfig, load_run_config


_MAX_PATHS = 20  # matched module paths listed; a 32-layer LLM with all-linear has 224


@dataclass
class ModuleGroup:
    """Modules sharing a last name (what target_modules lists), e.g. all `q_proj`."""

    name: str
    types: Counter
    count: int
    shapes: list[str]  # distinct shapes, in model order ("in->out" for linear layers)
    params: int  # all modules of the group together
    matched: int = 0
    quantized: int = 0  # with model.quantization: modules of the group that load quantized


@dataclass
class InspectReport:
    model_path: str
    task: str
    class_name: str
    model_type: str | None
    total_params: int
    groups: list[ModuleGroup]
    default_targets: list[str] | None  # LoRA's default for this model_type
    config_source: str | None = None
    method: str | None = None
    target_modules: list[str] | str | None = None  # as resolved for this model
    matched_paths: list[str] = field(default_factory=list)
    trainable_params: int | None = None
    error: str | None = None  # the config selects nothing / something it cannot adapt
    quantization: str | None = None  # with model.quantization: what loads quantized, and the sizes

    @property
    def ok(self) -> bool:
        return self.error is None

    def text(self) -> str:
        task = "none: bare model, pass --task for a head" if self.task == "none" else self.task
        lines = [f"model: {self.model_path}", f"  {self.class_name} (model_type {self.model_type}, task {task}), "
                 f"{self.total_params:,} parameters"]
        lines.append("targetable modules (target_modules names):")
        width = max([len(g.name) for g in self.groups] + [4])
        kinds = {g.name: ", ".join(sorted(g.types)) for g in self.groups}
        kind_width = max([len(k) for k in kinds.values()] + [4])
        shape_width = max([len(", ".join(g.shapes)) for g in self.groups] + [4])
        for g in self.groups:
            mark = f"   <- matched {g.matched}" if g.matched else ""
            mark += f"   [quantized {g.quantized}]" if g.quantized else ""
            lines.append(f"  {g.name:<{width}}  {kinds[g.name]:<{kind_width}}  x{g.count:<4} "
                         f"{', '.join(g.shapes):<{shape_width}} {g.params:>13,} params{mark}")
        if self.default_targets:
            lines.append(f"LoRA default targets for {self.model_type}: {', '.join(self.default_targets)}")
        if self.config_source is None:
            return "\n".join(lines)
        lines.append(f"config {self.config_source}: {self.method}, target_modules {self.target_modules!r}")
        if self.quantization:
            lines.append(f"  {self.quantization}")
        if self.error:
            lines.append(f"  error: {self.error}")
            return "\n".join(lines)
        share = 100 * (self.trainable_params or 0) / max(self.total_params, 1)
        lines.append(f"  matches {len(self.matched_paths)} modules; adapter {self.trainable_params:,} trainable "
                     f"parameters vs base {self.total_params:,} ({share:.2f}%)")
        shown = self.matched_paths if len(self.matched_paths) <= _MAX_PATHS else self.matched_paths[:_MAX_PATHS]
        lines += [f"    {path}" for path in shown]
        if len(shown) < len(self.matched_paths):
            lines.append(f"    ... and {len(self.matched_paths) - len(shown)} more")
        if self.task in ("seq-cls", "token-cls"):
            lines.append("  (the classifier head is sized for the model config's num_labels; "
                         "a run sizes it from the data)")
        return "\n".join(lines)


def inspect_model(model: str, config_path: str | None = None, overrides: list[str] = (),
                  task: str | None = None) -> InspectReport:
    """Module table of `model` (folder or hub id); with a run config, what its adapter selects."""
    check_model_path(model, "MODEL")
    config: RunConfig | None = None
    if config_path is not None:
        def use_model(raw: dict) -> None:
            # MODEL is a command-line path: it replaces model.path as is (not parsed as YAML).
            raw.setdefault("model", {})["path"] = model

        config = load_run_config(config_path, overrides, fill=use_model)
    if config is not None:
        model_cfg = config.model
    else:
        model_cfg = ModelConfig(path=model, task=task or _guess_task(model))
    base = meta_model(model_cfg) if model_cfg.task != "none" else _bare_meta_model(model)
    groups = _groups(base)
    total = sum(p.numel() for p in base.parameters())
    model_type = getattr(base.config, "model_type", None)
    defaults = get_method("LORA").default_targets.get(model_type)
    report = InspectReport(model, model_cfg.task, type(base).__name__, model_type, total, groups,
                           list(defaults) if defaults else None)
    if config is None:
        return report
    report.config_source, report.method = config_path, config.method
    if config.model.quantization is not None:
        report.quantization = _mark_quantized(base, groups, config)
    try:
        with torch.device("meta"):  # adapter tensors too: moving CPU tensors into meta parameters fails
            adapted = get_peft_model(base, adapter_config(config))
    except ValueError as exc:
        report.target_modules = config.adapter_fields().get("target_modules")
        report.error = str(exc)
        return report
    report.target_modules = getattr(adapted.peft_config["default"], "target_modules", None)
    by_name = {g.name: g for g in groups}
    for path, module in adapted.get_base_model().named_modules():
        if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSaveWrapper):
            report.matched_paths.append(path)
            group = by_name.get(path.rsplit(".", 1)[-1])
            if group is not None:
                group.matched += 1
    report.trainable_params, _ = adapted.get_nb_trainable_parameters()
    return report


def _mark_quantized(base: nn.Module, groups: list[ModuleGroup], config: RunConfig) -> str:
    """Count, per group, the layers `model.quantization` loads quantized (every nn.Linear but the
    output head, as transformers and `quantize_nf4` choose); the summary line."""
    q = config.model.quantization_config
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    by_name = {g.name: g for g in groups}
    count = 0
    for path, module in base.named_modules():
        if type(module) is nn.Linear and module is not head:
            count += 1
            group = by_name.get(path.rsplit(".", 1)[-1])
            if group is not None:
                group.quantized += 1
    element = {"bf16": 2, "fp16": 2}.get(config.model.dtype, 4)
    plain, quantized = base_memory(base, q, element)
    kind = f"{q.bits}-bit" + (f" {q.type}" if q.bits == 4 else "") + f" ({q.backend})"
    return (f"quantization: {count} linear layers load {kind}; base weights {quantized / 2**20:,.1f} MiB "
            f"instead of {plain / 2**20:,.1f} MiB")


def _guess_task(path: str) -> str:
    from ..config import PeftConfig

    try:
        return model_task(PeftConfig(), path)
    except LoadError:
        return "none"  # e.g. a bare encoder (BertModel): show its modules without a task head


def _bare_meta_model(path: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModel.from_config(config)


def _groups(model: nn.Module) -> list[ModuleGroup]:
    groups: dict[str, ModuleGroup] = {}
    for path, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not path or not own:
            continue
        name = path.rsplit(".", 1)[-1]
        params = sum(p.numel() for p in own)
        group = groups.get(name)
        if group is None:
            group = groups[name] = ModuleGroup(name, Counter(), 0, [], 0)
        group.types[type(module).__name__] += 1
        group.count += 1
        group.params += params
        if _shape(module) not in group.shapes:
            group.shapes.append(_shape(module))
    return list(groups.values())


def _shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    if isinstance(module, nn.Embedding):
        return f"{module.num_embeddings}x{module.embedding_dim}"
    if is_conv1d(module):
        return f"{module.weight.shape[0]}->{module.nf}"
    weight = getattr(module, "weight", None)
    return "x".join(str(d) for d in weight.shape) if weight is not None else "-"
