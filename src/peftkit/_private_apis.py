"""Every private (or internal-module) API of torch / transformers / accelerate (and datasets,
DeepSpeed) that peftkit touches, in one place, each with a check.

A new release may change any of these without notice. `APIS` names each one: what peftkit
relies on, where, and a check that exercises exactly that on the installed version;
tests/test_private_apis.py runs every check and fails naming the API and the version.
`check_all()` does the same at run time (e.g. after an upgrade).

Where it was cheap, the call sites get the API from here (`attn_implementation`,
`global_attention_function`, `register_attention_function`); the others keep their access
(hot kernel code, or files other work owns) and are listed with their path.
tests/test_private_apis.py also scans src/ and benchmarks/ for dotted private names of these
libraries (`torch.x._y`) and fails on one not listed here. The tests use a few more
(`torch._dynamo.reset`, `nn.Module._compiled_call_impl`); a change there fails those tests.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["APIS", "PrivateAPI", "PrivateAPIChanged", "check", "check_all"]


class PrivateAPIChanged(RuntimeError):
    """A private API peftkit relies on no longer behaves as it expects."""


@dataclass(frozen=True)
class PrivateAPI:
    name: str  # e.g. "torch._softmax_backward_data"
    library: str  # the distribution it comes from: "torch", "transformers", ...
    what: str  # what peftkit relies on
    used_in: tuple[str, ...]  # paths in the repository
    run: Callable[[], None]  # raises (any exception) when the API no longer behaves as relied on
    optional: bool = False  # the library is an optional dependency: skipped when not installed


APIS: list[PrivateAPI] = []


def _api(name: str, library: str, what: str, *used_in: str, optional: bool = False):
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        APIS.append(PrivateAPI(name, library, what, used_in, fn, optional))
        return fn

    return register


def installed_version(library: str) -> str | None:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(api: PrivateAPI) -> None:
    """Run `api`'s check; raise `PrivateAPIChanged` naming it, the installed version and the
    call sites when it fails."""
    try:
        api.run()
    except Exception as exc:  # noqa: BLE001 - any failure of the check is the message
        raise PrivateAPIChanged(
            f"{api.name} ({api.library} {installed_version(api.library)}) changed: {type(exc).__name__}: {exc}. "
            f"peftkit relies on: {api.what}. Used in: {', '.join(api.used_in)}"
        ) from exc


def check_all() -> list[str]:
    """The message of every failing check (empty when all pass); optional libraries that are
    not installed are skipped."""
    problems = []
    for api in APIS:
        if api.optional and installed_version(api.library) is None:
            continue
        try:
            check(api)
        except PrivateAPIChanged as exc:
            problems.append(str(exc))
    return problems


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _params(fn: Callable) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _source_of(module: str) -> str:
    """A module's source text without importing it or its package (DeepSpeed's import costs
    seconds and probes for accelerators)."""
    import os

    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name: found without importing anything
    _expect(spec is not None and bool(spec.submodule_search_locations), f"package {top} not found")
    path = os.path.join(list(spec.submodule_search_locations)[0], *rest) + ".py"
    _expect(os.path.exists(path), f"module {module} not found (no {path})")
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- accessors used by peftkit's call sites ---------------------------------------------------------
def attn_implementation(config: Any) -> Any:
    """`config._attn_implementation`: the attention implementation a transformers config selects."""
    return getattr(config, "_attn_implementation", None)


def global_attention_function(name: str) -> Callable:
    """The class-wide entry `name` of transformers' attention table (a fresh AttentionInterface
    has no instance-local overrides, so indexing it reads the shared table)."""
    from transformers import AttentionInterface

    return AttentionInterface()[name]


def register_attention_function(name: str, fn: Callable) -> None:
    """Make `fn` the class-wide entry `name`, and make sure the table the model code reads
    (`modeling_utils.ALL_ATTENTION_FUNCTIONS`) now returns it."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, fn)
    if ALL_ATTENTION_FUNCTIONS.get_interface(name, None) is not fn:
        raise PrivateAPIChanged(
            f"registered {fn!r} as attention function {name!r}, but transformers "
            f"{installed_version('transformers')}'s ALL_ATTENTION_FUNCTIONS returns "
            f"{ALL_ATTENTION_FUNCTIONS.get_interface(name, None)!r} (an instance-local override?)"
        )


# --- torch --------------------------------------------------------------------------------------------
@_api("torch._softmax_backward_data", "torch",
      "softmax's backward from the saved probabilities: (grad, probs, dim, input_dtype) -> grad of the scores",
      "src/peftkit/kernels/attention.py")
def _softmax_backward_data() -> None:
    import torch

    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    probs = x.softmax(-1)
    grad = torch.randn_like(probs)
    (expected,) = torch.autograd.grad(probs, x, grad)
    got = torch._softmax_backward_data(grad, probs.detach(), -1, probs.dtype)
    _expect(torch.allclose(got, expected), "result differs from autograd's softmax gradient")


@_api("torch.ops.aten._softmax.out", "torch",
      "in-place softmax of the logits chunk: _softmax.out(x, dim, half_to_float, out=x)",
      "src/peftkit/kernels/cross_entropy.py")
def _aten_softmax_out() -> None:
    import torch

    x = torch.randn(4, 7)
    expected = x.softmax(1)
    torch.ops.aten._softmax.out(x, 1, False, out=x)
    _expect(torch.allclose(x, expected), "result differs from softmax")


@_api("torch.ops.mkldnn._linear_pointwise", "torch",
      "oneDNN fp32 linear (x, weight, bias, 'none', [None], '') on x86 CPUs with mkldnn; without it fp32 "
      "fast-path matmuls fall back to torch.mm (slower on AMD CPUs)",
      "src/peftkit/kernels/_gemm.py")
def _mkldnn_linear_pointwise() -> None:
    import platform

    import torch

    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return  # not used on this machine
    _expect(hasattr(torch.ops.mkldnn, "_linear_pointwise"), "torch.ops.mkldnn has no _linear_pointwise")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")
    _expect(torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-5), "result differs from F.linear")


@_api("torch.ops.mkldnn._is_mkldnn_bf16_supported", "torch",
      "a bool: whether oneDNN has native bf16 GEMMs on this CPU (AVX512_BF16, AMX); without them a bf16 "
      "product through a transposed weight is computed with x column-major (~70x faster)",
      "src/peftkit/kernels/_gemm.py")
@_api("torch.ops.mkldnn._is_mkldnn_fp16_supported", "torch",
      "a bool: whether oneDNN has native fp16 GEMMs on this CPU (AVX512_FP16, AMX-FP16); as for bf16",
      "src/peftkit/kernels/_gemm.py")
def _mkldnn_16bit_supported() -> None:
    import torch

    if not torch.backends.mkldnn.is_available():
        return  # not used on this build
    for name in ("_is_mkldnn_bf16_supported", "_is_mkldnn_fp16_supported"):
        _expect(hasattr(torch.ops.mkldnn, name), f"torch.ops.mkldnn has no {name}")
        _expect(isinstance(getattr(torch.ops.mkldnn, name)(), bool), f"torch.ops.mkldnn.{name}() is not a bool")


@_api("torch.__config__.parallel_info()", "torch",
      "its text says 'parallel backend: OpenMP' on OpenMP builds (the C kernels then share torch's threads)",
      "src/peftkit/kernels/_native.py")
def _parallel_info() -> None:
    import torch

    _expect("parallel backend:" in torch.__config__.parallel_info(), "no 'parallel backend:' line")


@_api("torch.nn.Module._parameters", "torch",
      "the dict of a module's own parameters (read without triggering __getattr__ hooks)",
      "src/peftkit/methods/lora/plus.py", "src/peftkit/checkpoint/keys.py")
def _module_parameters() -> None:
    import torch

    layer = torch.nn.Linear(2, 3)
    _expect(isinstance(layer._parameters, dict) and layer._parameters.get("bias") is layer.bias,
            "Linear(2, 3)._parameters['bias'] is not the bias")


@_api("torch.nn.Module._forward_hooks / _forward_pre_hooks", "torch",
      "the dicts of a module's forward hooks: the chunked loss steps aside for a model with hooks",
      "src/peftkit/lm_head_split.py")
def _module_forward_hooks() -> None:
    import torch

    layer = torch.nn.Linear(2, 3)
    _expect(not layer._forward_hooks and not layer._forward_pre_hooks, "a fresh Linear has forward hooks")
    layer.register_forward_hook(lambda *a: None)
    layer.register_forward_pre_hook(lambda *a: None)
    _expect(len(layer._forward_hooks) == 1 and len(layer._forward_pre_hooks) == 1,
            "register_forward_(pre_)hook does not fill _forward_hooks / _forward_pre_hooks")


@_api("torch.utils._python_dispatch.TorchDispatchMode", "torch",
      "a dispatch mode subclass counting the aten ops of a kernel (benchmark only)",
      "benchmarks/kernels_micro.py")
def _torch_dispatch_mode() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    _expect(hasattr(TorchDispatchMode, "__torch_dispatch__"), "no __torch_dispatch__")


@_api("torch.utils._pytree.tree_flatten", "torch",
      "tree_flatten(obj) -> (leaves, spec), to find the tensors in an op's arguments (benchmark only)",
      "benchmarks/kernels_micro.py")
def _tree_flatten() -> None:
    import torch
    from torch.utils._pytree import tree_flatten

    t = torch.zeros(1)
    _expect(tree_flatten(((t, 1), {"k": t}))[0] == [t, 1, t], "leaves are not [t, 1, t]")


# --- transformers -------------------------------------------------------------------------------------
@_api("PreTrainedConfig._attn_implementation", "transformers",
      "the attention implementation a config selects ('sdpa', 'eager', ...), read to find the models to route",
      "src/peftkit/fast_attention.py (via attn_implementation)", "benchmarks/train_step.py")
def _config_attn_implementation() -> None:
    from transformers import LlamaConfig

    _expect(attn_implementation(LlamaConfig(attn_implementation="sdpa")) == "sdpa",
            "LlamaConfig(attn_implementation='sdpa')._attn_implementation is not 'sdpa'")


@_api("AttentionInterface table (transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS)", "transformers",
      "AttentionInterface.register('sdpa', fn) replaces the function every model's attention layer looks up "
      "at call time through ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)",
      "src/peftkit/fast_attention.py (via global/register_attention_function)")
def _attention_table() -> None:
    original = global_attention_function("sdpa")

    def probe(*args, **kwargs):
        return original(*args, **kwargs)

    try:
        register_attention_function("sdpa", probe)
        _expect(global_attention_function("sdpa") is probe, "a fresh AttentionInterface does not see the entry")
    finally:
        register_attention_function("sdpa", original)


@_api("attention-function calling convention", "transformers",
      "the attention layer passes itself first: fn(module, query, key, value, attention_mask, dropout=, scaling=, "
      "**kwargs) with [B, H, S, D] tensors, returns ([B, S, H, D], weights); the module has num_key_value_groups "
      "(GQA) and is_causal",
      "src/peftkit/fast_attention.py")
def _attention_calling_convention() -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    _expect(_params(global_attention_function("sdpa"))[:8] == ["module", "query", "key", "value", "attention_mask",
                                                               "dropout", "scaling", "is_causal"],
            f"the 'sdpa' function's parameters are {_params(global_attention_function('sdpa'))}")
    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    layer = LlamaAttention(config, layer_idx=0)
    _expect(layer.num_key_value_groups == 2 and layer.is_causal is True,
            "LlamaAttention lacks num_key_value_groups == 2 / is_causal")
    seen = []
    original = global_attention_function("sdpa")

    def probe(module, query, key, value, attention_mask, **kwargs):
        seen.append((module, tuple(query.shape), tuple(key.shape)))
        return original(module, query, key, value, attention_mask, **kwargs)

    register_attention_function("sdpa", probe)
    try:
        cos, sin = torch.ones(1, 3, 4), torch.zeros(1, 3, 4)
        out, _ = layer(torch.randn(1, 3, 16), position_embeddings=(cos, sin), attention_mask=None)
    finally:
        register_attention_function("sdpa", original)
    _expect(out.shape == (1, 3, 16), f"the layer's output is {tuple(out.shape)}")
    _expect(len(seen) == 1 and seen[0] == (layer, (1, 4, 3, 4), (1, 2, 3, 4)),
            f"the table's function was called as {seen} (expected once, with the layer and [B, H, S, D] q/k)")


@_api("transformers.pytorch_utils.Conv1D", "transformers",
      "GPT-2 style linear layer with its weight stored [in_features, out_features]",
      "src/peftkit/targeting.py", "src/peftkit/methods/lora/layer.py")
def _conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    _expect(tuple(Conv1D(nf=3, nx=2).weight.shape) == (2, 3), "Conv1D(nf=3, nx=2).weight is not [2, 3]")


@_api("transformers.trainer_pt_utils.LabelSmoother", "transformers",
      "__call__(model_output, labels, shift_labels=False, num_items_in_batch=None), overridden to shift labels",
      "src/peftkit/integrations/trainer.py")
def _label_smoother() -> None:
    from transformers.trainer_pt_utils import LabelSmoother

    params = _params(LabelSmoother.__call__)
    _expect(params[:5] == ["self", "model_output", "labels", "shift_labels", "num_items_in_batch"],
            f"LabelSmoother.__call__ parameters are {params}")


@_api("transformers.Trainer._save / _load_from_checkpoint / _load_best_model", "transformers",
      "the hooks overridden so checkpoints hold only the adapter: _save(output_dir, state_dict), "
      "_load_from_checkpoint(resume_from_checkpoint, model), _load_best_model()",
      "src/peftkit/integrations/trainer.py")
def _trainer_hooks() -> None:
    from transformers import Trainer

    expected = {"_save": ["self", "output_dir", "state_dict"],
                "_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"],
                "_load_best_model": ["self"]}
    for name, params in expected.items():
        _expect(hasattr(Trainer, name), f"Trainer has no {name}")
        _expect(_params(getattr(Trainer, name)) == params, f"Trainer.{name} parameters are "
                                                            f"{_params(getattr(Trainer, name))}, expected {params}")


@_api("transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "transformers",
      "model type -> causal-LM class name, to tell causal LMs apart",
      "src/peftkit/lm_head_split.py")
def _causal_lm_names() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _expect(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get("llama") == "LlamaForCausalLM", "no llama -> LlamaForCausalLM")


# --- accelerate -----------------------------------------------------------------------------------------
@_api("accelerate hooks' module._hf_hook", "accelerate",
      "add_hook_to_module sets module._hf_hook (offloaded / hooked modules are recognised by it)",
      "src/peftkit/lm_head_split.py")
def _hf_hook() -> None:
    import torch
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    layer = add_hook_to_module(torch.nn.Linear(2, 2), ModelHook())
    try:
        _expect(isinstance(getattr(layer, "_hf_hook", None), ModelHook), "no _hf_hook after add_hook_to_module")
    finally:
        remove_hook_from_module(layer)


@_api("AcceleratorState._shared_state / AcceleratorState._reset_state()", "accelerate",
      "the process-wide state (its '_mixed_precision') and its reset, to start a run with another precision",
      "src/peftkit/train/runtime.py")
def _accelerator_state() -> None:
    from accelerate.state import AcceleratorState

    _expect(hasattr(AcceleratorState, "_shared_state") and callable(getattr(AcceleratorState, "_reset_state", None)),
            "AcceleratorState lacks _shared_state or _reset_state")
    _expect("_mixed_precision" in inspect.getsource(AcceleratorState.__init__),
            "AcceleratorState.__init__ no longer stores _mixed_precision")


@_api("GradientState._set_sync_gradients(bool)", "accelerate",
      "tells DeepSpeed's engine which micro-batch ends the accumulation window",
      "src/peftkit/train/step.py")
def _set_sync_gradients() -> None:
    from accelerate.state import GradientState

    _expect(_params(GradientState._set_sync_gradients) == ["self", "sync_gradients"],
            "GradientState._set_sync_gradients(sync_gradients) not found")


# --- datasets ------------------------------------------------------------------------------------------
@_api("datasets.Dataset._indices / ._fingerprint", "datasets",
      "_indices is None when the Arrow table holds the rows in order (read straight); _fingerprint identifies "
      "a hub dataset's content",
      "src/peftkit/train/data.py", "src/peftkit/data/loading.py")
def _dataset_internals() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"a": [1, 2, 3]})
    _expect(ds._indices is None and isinstance(ds._fingerprint, str), "a fresh Dataset's _indices/_fingerprint")
    _expect(ds.shuffle(seed=0)._indices is not None, "a shuffled Dataset has no _indices mapping")


# --- DeepSpeed (optional) --------------------------------------------------------------------------------
@_api("DeepSpeed ZeRO 1/2 optimizer internals", "deepspeed",
      "single_partition_of_fp32_groups (ZeRO 1/2) or fp32_groups_flat_partition (bf16 ZeRO 1), "
      "_hp_optimizer_states_linked and _lazy_init_hp_params_optimizer_state(), to give a resumed optimizer its state",
      "src/peftkit/train/deepspeed_zero.py", optional=True)
def _deepspeed_zero() -> None:
    for module, flat in (("deepspeed.runtime.zero.stage_1_and_2", "self.single_partition_of_fp32_groups"),
                         ("deepspeed.runtime.bf16_optimizer", "self.fp32_groups_flat_partition")):
        text = _source_of(module)
        for needle in (flat, "self._hp_optimizer_states_linked", "def _lazy_init_hp_params_optimizer_state(self)"):
            _expect(needle in text, f"{module} has no {needle!r}")


# --- TRL (optional) ----------------------------------------------------------------------------------------
@_api("trl.trainer.sft_trainer.add_fused_lm_head", "trl",
      "SFTTrainer.__init__ calls the module global add_fused_lm_head(model, ...) on the model it trains; "
      "peftkit's SFTTrainer swaps it for the call's duration to patch the transformers model inside the wrapper",
      "src/peftkit/integrations/trl.py", optional=True)
def _trl_fused_lm_head() -> None:
    from trl.trainer import sft_trainer

    _expect(callable(getattr(sft_trainer, "add_fused_lm_head", None)), "trl.trainer.sft_trainer has no add_fused_lm_head")
    _expect(_params(sft_trainer.add_fused_lm_head)[:1] == ["model"],
            f"add_fused_lm_head parameters are {_params(sft_trainer.add_fused_lm_head)}")
    _expect("add_fused_lm_head(" in _source_of("trl.trainer.sft_trainer"), "SFTTrainer no longer calls add_fused_lm_head")


@_api("trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE", "trl",
      "the fused lm-head's forward passes this module global (tokens per chunk) to its chunked log-prob function "
      "at each call; peftkit's SFTTrainer sets it around compute_loss to chunks sized by memory",
      "src/peftkit/integrations/trl.py", optional=True)
def _trl_logprob_chunk_size() -> None:
    from trl.trainer import utils

    _expect(isinstance(getattr(utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None), int),
            "trl.trainer.utils has no int _CHUNKED_LOGPROB_CHUNK_SIZE")
    _expect("_CHUNKED_LOGPROB_CHUNK_SIZE," in _source_of("trl.trainer.utils"),
            "the fused lm-head no longer passes _CHUNKED_LOGPROB_CHUNK_SIZE to its chunked function")
