"""Tensors sharded by FSDP2: gathered whole for saving, cut back into shards for loading.

Under FSDP2 (`torch.distributed.fsdp.fully_shard`, which `accelerate launch --use_fsdp`
applies) every parameter, and the optimizer state that mirrors it, is a DTensor holding one
slice per process. Files hold whole tensors, so a checkpoint written by 2 processes is the
same file a single process writes. Gathering is a collective: every process must call these
functions for the same tensors in the same order.
"""

from __future__ import annotations

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (a tensor split or replicated over a device mesh)."""
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "device_mesh")


def gather_full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a DTensor; the tensor itself otherwise)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` split as `like` is (same mesh and placements) when `like` is a DTensor of the
    same shape; otherwise `whole` moved to `like`'s device and dtype."""
    if is_sharded(like) and tuple(whole.shape) == tuple(like.shape):
        from torch.distributed.tensor import distribute_tensor

        local = whole.to(device=like.to_local().device, dtype=like.dtype)
        # Every process holds the same whole tensor (read from the same file): no data moves.
        return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)
    return whole.to(device=like.device, dtype=like.dtype)
