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

import accelerate.accelerator
from _tiny_train import lm_rows, tiny_llama
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

from peftkit.train import TrainConfig, train

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
    train(model, lm_rows(13, seed=11), lm_rows(5, seed=12), TrainConfig(**run["config"]))
