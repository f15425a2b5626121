"""Run by test_deepspeed.py under `torchrun --nproc_per_node 2`: peftkit.train under DeepSpeed
ZeRO stage 2 on two CPU processes, once per JSON argument {"dropout": p, "config": {...}}.

Accelerate turns DeepSpeed on only for GPU-like devices. The patch below gives `Accelerator()`
the state `accelerate launch --use_deepspeed --zero_stage 2` gives it on GPUs (DeepSpeed's
communication initialised on the gloo group, a ZeRO-2 plugin); `prepare` then builds a real
DeepSpeed engine, which runs on DeepSpeed's CPU accelerator.
"""

import json
import os
import sys
from pathlib import Path

import accelerate.accelerator
from _tiny_train import lm_rows, tiny_llama, trainable
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType
from safetensors.torch import save_file

from peftkit.train import NonFiniteLossError, TrainConfig, train

_original_init = accelerate.accelerator.Accelerator.__init__


def _init_with_deepspeed(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    state = AcceleratorState()
    if state.distributed_type != DistributedType.DEEPSPEED:  # the state is process-wide
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        plugin = DeepSpeedPlugin(zero_stage=2)
        state.distributed_type = PartialState().distributed_type = DistributedType.DEEPSPEED
        state.deepspeed_plugins = {"default": plugin}
        plugin.select(_from_accelerator_state=True)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    self.deepspeed_engine_wrapped = None


accelerate.accelerator.Accelerator.__init__ = _init_with_deepspeed

for raw in sys.argv[1:]:
    run = json.loads(raw)
    model = tiny_llama(dropout=run["dropout"])
    poisoned, on_step_end = [], None
    if run.get("nan_after_step"):  # NaN activations from the next step on, on every process
        model.get_base_model().model.norm.register_forward_hook(
            lambda module, args, output: output * float("nan") if poisoned else output)

        def on_step_end(info, after=run["nan_after_step"]):
            if info.step == after:
                poisoned.append(True)
    try:
        train(model, lm_rows(13, seed=11), lm_rows(5, seed=12), TrainConfig(**run["config"]), on_step_end=on_step_end)
    except NonFiniteLossError as err:
        out = Path(run["config"]["output_dir"])
        if os.environ["RANK"] == "0":
            (out / "stopped.json").write_text(json.dumps({"step": err.step, "message": str(err)}))
            save_file(trainable(model), str(out / "weights_after_stop.safetensors"))
