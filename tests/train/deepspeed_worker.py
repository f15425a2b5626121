"""Run by test_deepspeed.py under `torchrun --nproc_per_node 2`: peftkit.train under DeepSpeed
ZeRO stage 2 on two CPU processes, once per JSON run given on the command line (see
_engine_runs.run_all).

Accelerate turns DeepSpeed on only for GPU-like devices. The patch below gives `Accelerator()`
the state `accelerate launch --use_deepspeed --zero_stage 2` gives it on GPUs (DeepSpeed's
communication initialised on the gloo group, a ZeRO-2 plugin); `prepare` then builds a real
DeepSpeed engine, which runs on DeepSpeed's CPU accelerator.
"""

import os
import sys

import accelerate.accelerator
from _engine_runs import run_all
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType

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

run_all(sys.argv[1:])
