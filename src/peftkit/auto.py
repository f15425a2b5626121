"""`AutoPeftModelForCausalLM.from_pretrained(ADAPTER_DIR)` and friends: load the base model an
adapter names and attach the adapter, in one call, as peft's `AutoPeftModel*` classes do.

The base is `base_model_name_or_path` from the adapter's adapter_config.json (or the
`base_model_name_or_path=` keyword, for an adapter saved on another machine), loaded with the
transformers Auto class of the task; the keyword arguments for it (dtype, quantization_config,
device_map, trust_remote_code, ...) pass through, any other keyword is an error. As in peft,
a tokenizer saved beside the adapter is read only to grow the base's embeddings to its size.
"""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from .checkpoint import SAFETENSORS_NAME
from .config import CONFIG_NAME, PeftConfig, TaskType
from .model import PeftModel

# transformers' from_pretrained arguments that are passed through to the base model's loading.
BASE_MODEL_KWARGS = frozenset({
    "dtype", "torch_dtype", "quantization_config", "device_map", "max_memory", "trust_remote_code",
    "attn_implementation", "low_cpu_mem_usage", "offload_folder", "offload_state_dict", "local_files_only",
    "cache_dir", "token", "use_safetensors", "variant", "num_labels", "id2label", "label2id",
})
# task_type -> (transformers Auto class, the peftkit Auto class to use for it)
_AUTO_CLASSES = {
    TaskType.CAUSAL_LM: ("AutoModelForCausalLM", "AutoPeftModelForCausalLM"),
    TaskType.SEQ_CLS: ("AutoModelForSequenceClassification", "AutoPeftModelForSequenceClassification"),
    TaskType.TOKEN_CLS: ("AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    TaskType.SEQ_2_SEQ_LM: ("AutoModelForSeq2SeqLM", "AutoPeftModelForSeq2SeqLM"),
    TaskType.QUESTION_ANS: ("AutoModelForQuestionAnswering", "AutoPeftModel"),
    TaskType.FEATURE_EXTRACTION: ("AutoModel", "AutoPeftModel"),
}
_CLASSIFIER_HEADS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


class _BaseAutoPeftModel:
    """Not instantiated: `from_pretrained` returns a PeftModel around the loaded base model."""

    task_type: str | None = None  # the task this class loads; None: the adapter's own (AutoPeftModel)

    def __init__(self, *args, **kwargs) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use "
                        f"{type(self).__name__}.from_pretrained(adapter_dir)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        *, base_model_name_or_path: str | None = None, **kwargs: Any) -> PeftModel:
        """The base model named by the adapter folder's config, loaded with `kwargs` (dtype,
        quantization_config, device_map, ...), with the adapter attached (frozen and in eval
        mode unless `is_trainable`)."""
        folder = os.fspath(pretrained_model_name_or_path)
        if config is not None:
            raise TypeError(f"config= is not supported: {cls.__name__} reads {CONFIG_NAME} from {folder!r}")
        if revision is not None:
            raise TypeError(f"revision={revision!r} is not supported: peftkit loads adapters from local folders")
        unknown = sorted(set(kwargs) - BASE_MODEL_KWARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unsupported keyword arguments {unknown}; accepted "
                            f"for loading the base model: {sorted(BASE_MODEL_KWARGS)}")
        peft_config = PeftConfig.from_pretrained(folder)
        base_path = base_model_name_or_path or peft_config.base_model_name_or_path
        if not base_path:
            raise ValueError(f"{os.path.join(folder, CONFIG_NAME)} has no base_model_name_or_path; pass "
                             f"base_model_name_or_path= to {cls.__name__}.from_pretrained")
        auto_name = cls._transformers_class(peft_config.task_type, base_path, folder, kwargs)
        kwargs = {**_head_size(folder, peft_config.task_type, kwargs), **kwargs}
        import transformers

        try:
            base = getattr(transformers, auto_name).from_pretrained(base_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the base model {base_path!r} (base_model_name_or_path of {folder!r}) with "
                             f"transformers.{auto_name}: {exc}") from None
        _grow_embeddings_to_tokenizer(base, folder, kwargs.get("trust_remote_code", False))
        model = PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable)
        if not is_trainable:
            model.eval()
        return model

    @classmethod
    def _transformers_class(cls, task_type: str | None, base_path: str, folder: str, kwargs: dict) -> str:
        """The transformers Auto class name for this class and the adapter's task_type."""
        if cls.task_type is not None:
            if task_type not in (None, "", cls.task_type):
                right = _AUTO_CLASSES.get(task_type, (None, "AutoPeftModel"))[1]
                raise ValueError(f"the adapter in {folder!r} has task_type={task_type!r}, not {cls.task_type!r}: load "
                                 f"it with {right}.from_pretrained (or AutoPeftModel)")
            return _AUTO_CLASSES[cls.task_type][0]
        if task_type not in (None, ""):
            if task_type not in _AUTO_CLASSES:
                raise ValueError(f"task_type={task_type!r} in {folder!r} is not one of {sorted(_AUTO_CLASSES)}")
            return _AUTO_CLASSES[task_type][0]
        # No task_type: the class the base model's config names (its `architectures`).
        from transformers import AutoConfig

        trust = kwargs.get("trust_remote_code", False)
        try:
            architectures = getattr(AutoConfig.from_pretrained(base_path, trust_remote_code=trust), "architectures",
                                    None) or []
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the base model config {base_path!r}: {exc}") from None
        import transformers

        if not architectures or not hasattr(transformers, architectures[0]):
            raise ValueError(f"the adapter in {folder!r} has no task_type and the base config names no transformers "
                             f"class (architectures={architectures}); use AutoPeftModelForCausalLM (or the class for "
                             f"its task)")
        return architectures[0]


def _head_size(folder: str, task_type: str | None, kwargs: dict) -> dict:
    """num_labels read off a saved classifier head (a SEQ_CLS / TOKEN_CLS adapter saves the head
    in full), so that the base gets a head of the saved size unless the caller says otherwise."""
    if task_type not in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) or {"num_labels", "id2label"} & set(kwargs):
        return {}
    from safetensors import safe_open

    path = os.path.join(folder, SAFETENSORS_NAME)
    if not os.path.isfile(path):
        return {}
    with safe_open(path, framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(_CLASSIFIER_HEADS):
                return {"num_labels": fh.get_slice(key).get_shape()[0]}
    return {}


def _grow_embeddings_to_tokenizer(base: nn.Module, folder: str, trust_remote_code: bool) -> None:
    """peft's rule: a tokenizer saved with the adapter that has more tokens than the base's
    embedding rows (tokens added in training) grows the embeddings to its size."""
    if not os.path.isfile(os.path.join(folder, TOKENIZER_CONFIG_NAME)) or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    """Any task: the Auto class of the adapter's task_type, else the base config's own class."""


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    task_type = TaskType.CAUSAL_LM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    task_type = TaskType.SEQ_CLS


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    task_type = TaskType.TOKEN_CLS


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM
