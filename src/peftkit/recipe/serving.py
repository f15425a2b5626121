"""`peftkit export ADAPTER --check vllm|sglang`: will this adapter folder load in that server,
and if not, why (one reason a line). Reads only adapter_config.json and adapter_model.safetensors.

The rules follow each server's adapter loader as its code and documentation describe it
(vLLM: vllm/lora/peft_helper.py, LoRAConfig, the models' LoRA modules; SGLang: its LoRA serving
docs and python/sglang/srt/lora/); servers change, so a reason names the setting it is about:
- both serve plain LoRA only: no other method, no DoRA, no `modules_to_save` copies, no bias;
- vLLM refuses ranks above `--max-lora-rank` (LoRAConfig default 16, rank_pattern included);
  SGLang infers its max_lora_rank from the adapters it loads, so it has no default limit;
- vLLM refuses inits that change the base weights (PiSSA, OLoRA, CorDA, LoftQ);
- SGLang adapts the attention and MLP projections, not embed_tokens / lm_head;
- tensors other than LoRA A / B are not read (a server would silently drop them), and NaN / Inf
  values would be served.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..checkpoint import SAFETENSORS_NAME
from ..checkpoint.io import atomic_write_text
from ..config import CONFIG_NAME

# Linear layers of the decoder blocks each server adapts in Llama-family models (llama,
# mistral, qwen2, qwen3); packed names (qkv_proj, gate_up_proj) are the servers' fused layers.
_DECODER = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"}
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
# Inits that move the principal part out of the base weights: the adapter needs a changed base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$|"
                       r"^base_model\.model\.(.+)\.(lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class Server:
    name: str
    default_max_rank: int | None  # None: no limit unless --max-lora-rank is given
    modules: frozenset  # module names it adapts in the Llama family
    refuses_base_changing_init: bool


SERVERS = {
    "vllm": Server("vLLM", 16, frozenset(_DECODER | {"embed_tokens", "lm_head"}), True),
    "sglang": Server("SGLang", None, frozenset(_DECODER), False),
}


@dataclass
class ServingReport:
    server: str
    adapter_dir: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: str | None = None
    not_written: str | None = None  # the --out folder, left alone because the adapter is not ready

    @property
    def ready(self) -> bool:
        return not self.reasons

    def text(self) -> str:
        head = (f"{self.adapter_dir}: ready for {self.server}" if self.ready
                else f"{self.adapter_dir}: NOT ready for {self.server} ({len(self.reasons)} reason(s))")
        lines = [head] + [f"not ready: {r}" for r in self.reasons] + [f"note: {n}" for n in self.notes]
        if self.written:
            lines.append(f"clean adapter folder written to {self.written} ({CONFIG_NAME}, {SAFETENSORS_NAME})")
        if self.not_written:
            lines.append(f"nothing written to {self.not_written}: the adapter is not ready")
        return "\n".join(lines)


def check_serving(adapter_dir: str, server: str, *, max_lora_rank: int | None = None, out: str | None = None,
                  base: str | None = None) -> ServingReport:
    """Whether `adapter_dir` loads in `server` (a key of SERVERS); `out`: when ready, write a
    folder holding only what the server reads. `max_lora_rank`: the server's setting (default:
    its default). `base`: the base model, for its architecture (default base_model_name_or_path)."""
    if server not in SERVERS:
        raise ValueError(f"--check {server!r} is not a server peftkit checks for; accepted: {', '.join(SERVERS)}")
    if max_lora_rank is not None and max_lora_rank <= 0:
        raise ValueError(f"--max-lora-rank {max_lora_rank} must be a positive integer")
    rules = SERVERS[server]
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, SAFETENSORS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {adapter_dir!r} is not a saved adapter folder")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    keys, nonfinite = _read_tensors(weights_path)
    report = ServingReport(rules.name, adapter_dir)
    report.reasons += _config_reasons(config, rules, max_lora_rank)
    modules, extra = _lora_modules(keys)
    report.reasons += _module_reasons(modules, rules, _model_type(config, base), report.notes)
    if extra:
        report.reasons.append(f"{len(extra)} tensor(s) other than LoRA A/B, which {rules.name} does not read: "
                              f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    if nonfinite:
        report.reasons.append(f"non-finite values in {nonfinite}: the server would serve NaN outputs")
    if out is not None and report.ready:
        write_clean_adapter(adapter_dir, out)
        report.written = out
    elif out is not None:
        report.not_written = out
    return report


def _config_reasons(config: dict, rules: Server, max_lora_rank: int | None) -> list[str]:
    reasons = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"method {peft_type}: {rules.name} serves LoRA adapters only"]
    if config.get("use_dora"):
        reasons.append(f"DoRA (use_dora=true): {rules.name} does not load DoRA; merge it (peftkit merge) instead")
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save {config['modules_to_save']}: {rules.name} does not load whole-module "
                       f"copies; merge the adapter instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        reasons.append(f"bias={config.get('bias')!r}{' lora_bias=true' if config.get('lora_bias') else ''}: "
                       f"{rules.name} does not load adapter bias terms")
    init = config.get("init_lora_weights")
    if rules.refuses_base_changing_init and isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        reasons.append(f"init_lora_weights={init!r}: {rules.name} refuses inits that change the base weights")
    limit = max_lora_rank if max_lora_rank is not None else rules.default_max_rank
    ranks = [("r", config.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in
                                        (config.get("rank_pattern") or {}).items()]
    for where, rank in ranks:
        if limit is not None and isinstance(rank, int) and rank > limit:
            default = " (its default; raise it with --max-lora-rank)" if max_lora_rank is None else ""
            reasons.append(f"{where}={rank} is above {rules.name}'s max_lora_rank {limit}{default}")
    return reasons


def _lora_modules(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """{module path: its last name} of the LoRA A/B tensors, and every other tensor name."""
    modules, extra = {}, []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            extra.append(key)
            continue
        path = match.group(1) or match.group(3)
        modules[path] = path.rsplit(".", 1)[-1]
    return modules, extra


def _module_reasons(modules: dict[str, str], rules: Server, model_type: str | None, notes: list[str]) -> list[str]:
    if model_type not in LLAMA_FAMILY:
        notes.append(f"target modules not checked: peftkit knows {rules.name}'s LoRA modules for "
                     f"{', '.join(LLAMA_FAMILY)} only (base model_type {model_type!r})")
        return []
    unsupported = sorted({name for name in modules.values() if name not in rules.modules})
    if not unsupported:
        return []
    return [f"target module(s) {', '.join(unsupported)}: {rules.name} adapts only "
            f"{', '.join(sorted(rules.modules))} in {model_type} models"]


def _model_type(config: dict, base: str | None) -> str | None:
    path = base or config.get("base_model_name_or_path")
    if not path:
        return None
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(path), "model_type", None)
    except (OSError, ValueError):
        return None


def _read_tensors(path: str) -> tuple[list[str], str | None]:
    """The tensor names of a safetensors file, and the first tensor holding NaN / Inf (None if none)."""
    from safetensors import SafetensorError, safe_open

    from ..checkpoint.export import first_nonfinite

    try:
        with safe_open(path, framework="pt") as fh:
            names = sorted(fh.keys())
            return names, first_nonfinite((name, fh.get_tensor(name)) for name in names)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file ({exc})") from None


def write_clean_adapter(adapter_dir: str, out: str) -> None:
    """Copy only adapter_config.json and adapter_model.safetensors to the folder `out`."""
    from ..atomic_files import atomic_replace

    if os.path.isfile(out):
        raise ValueError(f"--out {out!r} is a file; give a folder for the clean adapter")
    if os.path.abspath(out) == os.path.abspath(adapter_dir):
        raise ValueError(f"--out {out!r} is the adapter folder itself; give another folder")
    others = sorted(set(os.listdir(out)) - {CONFIG_NAME, SAFETENSORS_NAME}) if os.path.isdir(out) else []
    if others:
        raise ValueError(f"--out {out!r} holds other files ({', '.join(others[:5])}); give a new or empty folder, "
                         f"so that it holds only what the server reads")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(adapter_dir, CONFIG_NAME), encoding="utf-8") as fh:
        atomic_write_text(os.path.join(out, CONFIG_NAME), fh.read())

    def copy(tmp: str) -> None:
        with open(os.path.join(adapter_dir, SAFETENSORS_NAME), "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)

    atomic_replace(os.path.join(out, SAFETENSORS_NAME), copy)

