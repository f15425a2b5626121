"""Run by test_fsdp.py under `torchrun --nproc_per_node 2`: peftkit.train with the model
sharded by FSDP2 over two CPU processes, once per JSON run given on the command line (see
_engine_runs.run_all).

Accelerate turns FSDP on only for GPU-like devices; on CPU it would silently run DDP. The
patch below makes `Accelerator()` take the FSDP2 path (Accelerate's own `fully_shard`
preparation, on a gloo CPU mesh) exactly as `accelerate launch --use_fsdp --fsdp_version 2`
does on GPUs, so the loop's FSDP2 code runs here for real.
"""

import sys

import accelerate.accelerator
from _engine_runs import run_all
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_original_init = accelerate.accelerator.Accelerator.__init__


def _init_with_fsdp2(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    # The state is process-wide: a second run finds it switched already.
    assert self.state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP), self.state.distributed_type
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
    )
    AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    PartialState().distributed_type = DistributedType.FSDP


accelerate.accelerator.Accelerator.__init__ = _init_with_fsdp2


def _check_sharded(model):
    sharded = [n for n, p in model.named_parameters() if p.requires_grad and type(p.data).__name__ != "DTensor"]
    assert not sharded, f"FSDP2 did not shard {sharded[:3]}"


run_all(sys.argv[1:], after_train=_check_sharded)
