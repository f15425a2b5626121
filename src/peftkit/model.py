"""PeftModel: a base model with named adapters — forward, switching, merge, save and load."""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
from typing import Iterator

import torch
import torch.nn as nn

from .checkpoint import (SAFETENSORS_NAME, LoadReport, collect_adapter_state, collect_prompt_learning_state,
                         load_adapter_weights, load_prompt_learning_weights, trained_bias_params)
from .checkpoint.adapter_check import read_checked_adapter
from .checkpoint.io import adapter_folder, check_adapter_name, write_safetensors
from .checkpoint.sharded import gather_full
from . import fast_attention
from .config import PeftConfig, TaskType
from .injection import add_modules_to_save, adapter_layers, eject_layers, inject_adapter
from .methods import get_method, quantized_base
from .methods.base import ModulesToSaveWrapper
from .methods.prompt_learning import word_embeddings
from .targeting import SEQ_CLS_HEAD_NAMES
from .tuner import TunerModel
from . import lm_head_split, mixed_adapters


class PeftModel(nn.Module):
    """Wraps a base model (modified in place) that carries one or more named adapters.

    The module tree is peft's: `base_model` is a `TunerModel` whose `.model` is the adapted
    model (`get_base_model()`), so parameter names match peft's. Attribute access and calls
    fall through to the adapted model, so `config`, `device` and friends work as on the original. Prompt-learning adapters (prompt/prefix tuning) live in
    `prompt_encoder` (one encoder per adapter) and take over `forward` and `generate`.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        # peft's tree: a tuner between the PeftModel and a layer-adapted model (see tuner.py)
        self.base_model = model if get_method(peft_config.peft_type).prompt_learning else TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self.prompt_encoder = nn.ModuleDict()
        self._adapters_disabled = False
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            self._make_inputs_require_grad()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    #: A causal LM called in train mode with `labels` computes its loss from the hidden states in
    #: row chunks and returns `logits=None` (no [B, T, V] logits, as Liger-Kernel and Unsloth do).
    #: Set False to get the base model's own forward, full logits included.
    chunked_loss: bool = True

    def forward(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # one adapter per row (peft's mixed-adapter batch)
            with mixed_adapters.rows_use_adapters(self, adapter_names, args, kwargs):
                return self.base_model(*args, **kwargs)
        encoder = self._active_prompt_encoder()
        if encoder is not None:
            return encoder.run(self.get_base_model(), args, kwargs)
        if not args and self.training and kwargs.get("labels") is not None and self.chunked_loss_blocker(kwargs) is None:
            return lm_head_split.chunked_causal_lm_output(self.get_base_model(), kwargs)
        return self.base_model(*args, **kwargs)

    # --- the backbone / head split of a causal LM ------------------------------------------------
    def chunked_loss_blocker(self, batch: dict) -> str | None:
        """Why `chunked_causal_lm_loss(batch)` (and the train-mode forward with labels) would not
        apply to this model and batch, or None when it applies."""
        if not self.chunked_loss:
            return "model.chunked_loss is False"
        if self._adapters_disabled:
            return "adapters are disabled (disable_adapter): the base model's own forward runs"
        if self._active_prompt_encoder() is not None:
            return f"a prompt-learning adapter ({self.peft_type}) is active: it changes the inputs of the forward"
        return lm_head_split.split_blocker(self.get_base_model(), batch)

    def chunked_causal_lm_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_sum fp32 0-d, n_targets int64 0-d): next-token cross-entropy summed over the
        targets of `batch` (the forward's keyword arguments with unshifted `labels` [B, T]),
        from the backbone's hidden states through the lm_head in row chunks."""
        reason = self.chunked_loss_blocker(batch)
        if reason is not None:
            raise ValueError(f"The chunked causal-LM loss does not apply: {reason}")
        loss_sum, n, _ = lm_head_split.chunked_loss(self.get_base_model(), batch)
        return loss_sum, n

    def generate(self, *args, **kwargs):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:  # one adapter per row (peft's mixed-adapter batch)
            with mixed_adapters.rows_use_adapters(self, adapter_names, args, kwargs, generate=True):
                return self.base_model.generate(*args, **kwargs)
        encoder = self._active_prompt_encoder()
        if encoder is None:
            return self.base_model.generate(*args, **kwargs)
        return encoder.generate(self.get_base_model(), args, kwargs)

    def _active_prompt_encoder(self) -> nn.Module | None:
        if self._adapters_disabled or self.active_adapter not in self.prompt_encoder:
            return None
        return self.prompt_encoder[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        """The adapted transformers (or plain torch) model."""
        base = self.base_model
        return base.model if isinstance(base, TunerModel) else base

    # --- adapters ------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @property
    def peft_type(self) -> str:
        return self.peft_config[self.active_adapter].peft_type

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add (but do not activate) an adapter. All adapters of a model share one method."""
        check_adapter_name(adapter_name)  # it names a sub-folder when saved
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; existing adapters: {list(self.peft_config)}")
        existing = {c.peft_type for c in self.peft_config.values()}
        if existing and peft_config.peft_type not in existing:
            raise ValueError(f"Cannot add a {peft_config.peft_type} adapter to a model with {sorted(existing)} "
                             f"adapters; use one method per model")
        config = copy.deepcopy(peft_config)
        # PEFT trains and saves the classifier head of both classification tasks in full.
        if config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) and hasattr(config, "modules_to_save"):
            heads = [n for n in SEQ_CLS_HEAD_NAMES if n not in (config.modules_to_save or [])]
            config.modules_to_save = list(config.modules_to_save or []) + heads
        if config.base_model_name_or_path is None:
            model_config = getattr(self.get_base_model(), "config", None)
            config.base_model_name_or_path = getattr(model_config, "name_or_path", None) or None
        method = get_method(config.peft_type)
        if method.prompt_learning:
            if "word_embeddings" not in self._modules:  # peft's tree holds it here too (state_dict keys)
                self.word_embeddings = word_embeddings(self.get_base_model())
            self.prompt_encoder[adapter_name] = method.create_encoder(self.get_base_model(), config)
            add_modules_to_save(self.get_base_model(), config.modules_to_save or [], adapter_name)
        else:
            inject_adapter(self.get_base_model(), method, config, adapter_name)
        self.peft_config[adapter_name] = config
        self._apply_active()

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}")
        self.active_adapter = adapter_name
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available adapters: {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError(f"Cannot delete {adapter_name!r}, the only adapter; use unload() to get the base model back")
        for _, layer in adapter_layers(self.get_base_model()):
            layer.delete_adapter(adapter_name)
        if adapter_name in self.prompt_encoder:
            del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        eject_layers(self.get_base_model(), merge=False, only_empty=True)
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config))
        self._apply_active()

    def _apply_active(self) -> None:
        """Activate `active_adapter` in every layer and set exactly its parameters trainable."""
        config = self.peft_config[self.active_adapter]
        trainable = not config.inference_mode
        for _, layer in adapter_layers(self.get_base_model()):
            layer.set_adapter(self.active_adapter, trainable=trainable)
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name == self.active_adapter)
        bias = getattr(config, "bias", "none")
        if bias != "none":
            for _, param in trained_bias_params(self.get_base_model(), bias):
                param.requires_grad_(trainable)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model's output: no adapter
        layer or prompt encoder adds anything, the forward is the base model's own (full logits,
        its own loss) and attention is transformers' own even where `enable_fast_attention`
        routed it (a DPO-style reference pass must not differ from the plain base model)."""
        layers = [layer for _, layer in adapter_layers(self.get_base_model())]
        previous = [layer.disabled for layer in layers]
        was_disabled = self._adapters_disabled
        routed = fast_attention.fast_attention_enabled(self.get_base_model())
        for layer in layers:
            layer.disabled = True
        self._adapters_disabled = True
        if routed:
            fast_attention.disable_fast_attention(self.get_base_model())
        try:
            yield
        finally:
            if routed:
                fast_attention.enable_fast_attention(self.get_base_model())
            for layer, was in zip(layers, previous):
                layer.disabled = was
            self._adapters_disabled = was_disabled

    # --- merge / unload ------------------------------------------------------------------------
    def _refuse_merge(self) -> None:
        if len(self.prompt_encoder):
            raise ValueError(f"{self.peft_type} (prompt learning) has no weights to merge: its virtual tokens are "
                             f"extra inputs, not changes to the base weights. Keep the PeftModel for inference, or use "
                             f"unload() to get the base model back without the adapter")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._refuse_merge()
        for _, layer in adapter_layers(self.get_base_model()):
            if not isinstance(layer, ModulesToSaveWrapper):
                layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.get_base_model()):
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None, *,
                         requantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """Fold the active adapter into the base weights and return the plain base model.

        On a quantized base (4/8-bit) every quantized layer is dequantized, the adapter merged in
        fp32, and the result is a plain model in `dtype` (default: the dtype of the model's
        unquantized weights, e.g. its embeddings). `requantize=True` instead quantizes each merged weight again in its layer's format
        (peft's behaviour; the rounding loses part of the adapter's change)."""
        self._refuse_merge()
        base = self.get_base_model()
        quantized = quantized_base.quantized_layers(base)
        if (dtype is not None or requantize) and not quantized:
            raise ValueError("merge_and_unload: dtype= and requantize= apply to a quantized base only; this model has "
                             "no quantized layers (cast the merged model with .to(dtype) instead)")
        fast_attention.disable_fast_attention(self)  # before the adapter layers (marked too) leave the tree
        if quantized and not requantize:
            dtype = dtype or _unquantized_dtype(base)
            replaced = quantized_base.dequantize_model(base, torch.float32)
            eject_layers(base, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)
            for path in replaced:  # an adapter's base layer now sits where the adapter layer was
                base.get_submodule(path.removesuffix(".base_layer")).to(dtype)
            return base
        eject_layers(base, merge=True, safe_merge=safe_merge, adapter_names=adapter_names)
        return base

    def unload(self) -> nn.Module:
        """Remove every adapter layer (no merge) and return the original base model."""
        fast_attention.disable_fast_attention(self)  # before the adapter layers (marked too) leave the tree
        eject_layers(self.get_base_model(), merge=False)
        return self.get_base_model()

    # --- parameters ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the base model's layers; inputs are made to require grad so that no
        checkpointed block sees only frozen inputs ("element 0 ... does not require grad")."""
        blocked = [type(e).__name__ for e in self.prompt_encoder.values() if not e.supports_gradient_checkpointing]
        if blocked:
            raise ValueError(f"{self.peft_type} does not work with gradient checkpointing: transformers drops the "
                             f"key/value cache that carries its prefix inside checkpointed layers")
        kwargs = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        self.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self._make_inputs_require_grad()

    def _make_inputs_require_grad(self) -> None:
        if hasattr(self.get_base_model(), "enable_input_require_grads"):
            self.get_base_model().enable_input_require_grads()

    # --- save / load ----------------------------------------------------------------------------
    def _adapter_dir(self, save_directory: str, adapter_name: str) -> str:
        return adapter_folder(save_directory, adapter_name)

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors under their PEFT keys."""
        name = adapter_name or self.active_adapter
        if name in self.prompt_encoder:
            embeddings = self.prompt_encoder[name].saved_embeddings().detach().cpu()
            return collect_prompt_learning_state(self.get_base_model(), name, embeddings)
        return collect_adapter_state(self.get_base_model(), name, getattr(self.peft_config[name], "bias", "none"))

    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True, **_: object) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors; adapters other
        than "default" go to a sub-folder named after them (PEFT's layout).

        Under FSDP every process must call this (tensors sharded over processes are gathered
        whole, a collective); only the one with `is_main_process` writes."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; give a folder path")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; available adapters: {list(self.peft_config)}")
        for name in names:  # every name is checked before anything is written
            check_adapter_name(name)
        for name in names:
            state = {key: gather_full(tensor) for key, tensor in self.adapter_state_dict(name).items()}
            if not is_main_process:
                continue
            out = self._adapter_dir(save_directory, name)
            os.makedirs(out, exist_ok=True)
            write_safetensors(os.path.join(out, SAFETENSORS_NAME), state)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(out)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, check_finite: bool = True, **_: object) -> "PeftModel":
        """Attach the adapter saved in folder `model_id` to `model`. Its tensors must be floating
        point and (unless `check_finite=False`, to inspect a broken file) free of NaN / Inf."""
        check_adapter_name(adapter_name)
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        state = read_checked_adapter(model_id, config, check_finite)
        peft_model = peft_model_class(type(model))(model, config, adapter_name)
        peft_model._load_state(adapter_name, state, model_id)
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, check_finite: bool = True,
                     **_: object) -> LoadReport:
        """Add the adapter saved in `model_id` under `adapter_name` (not activated); checked as in
        `from_pretrained`."""
        check_adapter_name(adapter_name)
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        state = read_checked_adapter(model_id, config, check_finite)
        self.add_adapter(adapter_name, config)
        return self._load_state(adapter_name, state, model_id)

    def load_adapter_state(self, adapter_name: str, state: dict[str, torch.Tensor]) -> LoadReport:
        """Copy `state` (PEFT keys) into the existing adapter in place, so that optimizer state
        that refers to its parameters stays valid; returns missing / unexpected keys."""
        if adapter_name in self.prompt_encoder:
            report, embeddings = load_prompt_learning_weights(self.get_base_model(), adapter_name, state)
            if embeddings is not None:
                self.prompt_encoder[adapter_name].load_saved_embeddings(embeddings)
        else:
            bias = getattr(self.peft_config[adapter_name], "bias", "none")
            report = load_adapter_weights(self.get_base_model(), adapter_name, state, bias)
        self._apply_active()
        return report

    def _load_state(self, adapter_name: str, state: dict, source: str) -> LoadReport:
        report = self.load_adapter_state(adapter_name, state)
        if report.missing_keys or report.unexpected_keys:
            warnings.warn(f"Loading adapter {adapter_name!r} from {source!r}: {report}", stacklevel=3)
        return report

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", **kwargs) -> None:
        """LoRA only: a new adapter combining `adapters` (linear / cat / svd / ties / ...), added but
        not activated; see `methods.lora.weighted` for the combination types and their options."""
        from .methods.lora.weighted import fill_weighted_adapter, weighted_adapter_configs

        injected, kept = weighted_adapter_configs(self.get_base_model(), self.peft_config, adapters, weights,
                                                  adapter_name, combination_type, **kwargs)
        self.add_adapter(adapter_name, injected)
        self.peft_config[adapter_name].init_lora_weights = kept.init_lora_weights
        try:
            fill_weighted_adapter(self.get_base_model(), adapters, weights, adapter_name, combination_type,
                                  **{k: v for k, v in kwargs.items() if k != "svd_rank"})  # rank: in the config
        except Exception:
            self.delete_adapter(adapter_name)  # leave the model as it was
            raise


_CLASS_CACHE: dict[type, type] = {}


def _unquantized_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a quantized model keeps its other weights in (embeddings, norms, head)."""
    quantized = {id(p) for m in model.modules() if quantized_base.is_quantized(m) for p in m.parameters()}
    sizes: dict[torch.dtype, int] = {}
    for p in model.parameters():  # frozen ones: the adapters' own (fp32) parameters do not count
        if id(p) not in quantized and p.is_floating_point() and not p.requires_grad:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def peft_model_class(base_cls: type) -> type:
    """A PeftModel subclass whose `forward` shows the base model's signature, so tools that
    inspect it (transformers.Trainer's column and label detection) see the real arguments."""
    if base_cls not in _CLASS_CACHE:
        def forward(self, *args, **kwargs):
            return PeftModel.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_cls.forward)
        except (TypeError, ValueError):
            pass
        _CLASS_CACHE[base_cls] = type(f"PeftModelFor{base_cls.__name__}", (PeftModel,),
                                      {"forward": forward, "__module__": __name__})
    return _CLASS_CACHE[base_cls]


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `model`, add adapter `adapter_name` described by `peft_config`, return the wrapper."""
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; use model.add_adapter(name, config) to add another adapter")
    return peft_model_class(type(model))(model, peft_config, adapter_name)
