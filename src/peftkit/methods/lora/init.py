"""LoRA initialisation schemes as pure functions (PEFT 0.21 semantics).

`init_default` / `init_gaussian` give B = 0, so a fresh adapter adds nothing. `init_pissa` and
`init_olora` instead put the principal part of the base weight into A and B and return the
base weight with that part removed (the "residual"): the model's output is unchanged, but the
adapter only makes sense on top of that residual base (see docs/methods.md).

Shapes: A is [r, in], B is [out, r]; a weight passed with `fan_in_fan_out=True` (GPT-2's
Conv1D) is [in, out] and the new weight comes back in that same layout and dtype.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
ACCEPTED = "True, False, 'gaussian', 'pissa', 'pissa_niter_[N]' (N >= 0 subspace iterations) or 'olora'"
_DECOMPOSABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class InitSpec:
    """A parsed `init_lora_weights`: kind is "default", "none", "gaussian", "pissa" or "olora"."""

    kind: str
    niter: int | None = None  # PiSSA with randomized SVD (torch.svd_lowrank) when set

    @property
    def changes_base_weights(self) -> bool:
        return self.kind in ("pissa", "olora")


def parse_init(value: bool | str) -> InitSpec:
    """Parse `init_lora_weights` the way PEFT reads it; raise ValueError naming what is accepted.

    As in PEFT, 'gaussian' and 'olora' are case-insensitive and 'pissa...' is not.
    """
    if value is True:
        return InitSpec("default")
    if value is False:
        return InitSpec("none")
    if isinstance(value, str):
        if value.lower() == "gaussian":
            return InitSpec("gaussian")
        if value.lower() == "olora":
            return InitSpec("olora")
        if value == "pissa":
            return InitSpec("pissa")
        match = _PISSA_NITER.fullmatch(value)
        if match:
            return InitSpec("pissa", niter=int(match.group(1)))
    raise ValueError(f"init_lora_weights={value!r} is not supported; use one of {ACCEPTED}")


def init_problem(value: object) -> str | None:
    """The config-validation sentence for a bad `init_lora_weights`, or None when it is valid."""
    try:
        parse_init(value)  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    return None


def init_default(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ kaiming-uniform(a=sqrt(5)) (nn.Linear's own init), B = 0; fp32 on the CPU.

    Drawn on the CPU from the global RNG, so a seeded run gives PEFT's exact numbers.
    """
    lora_A = torch.empty(a_shape)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    return lora_A, torch.zeros(b_shape)


def init_gaussian(a_shape: tuple[int, ...], b_shape: tuple[int, ...], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ N(0, (1/r)^2), B = 0; fp32 on the CPU."""
    lora_A = torch.empty(a_shape)
    nn.init.normal_(lora_A, std=1 / r)
    return lora_A, torch.zeros(b_shape)


def _as_out_in_fp32(weight: torch.Tensor, r: int, fan_in_fan_out: bool, what: str) -> torch.Tensor:
    if weight.dtype not in _DECOMPOSABLE_DTYPES:
        raise TypeError(f"{what} needs a float32, float16 or bfloat16 base weight, got {weight.dtype}; "
                        f"initialise before quantising the base model")
    matrix = weight.detach().to(torch.float32)
    matrix = matrix.T if fan_in_fan_out else matrix
    if r > min(matrix.shape):
        raise ValueError(f"{what} needs r <= min(out_features, in_features) = {min(matrix.shape)} for a weight of "
                         f"shape [out, in] = {list(matrix.shape)}, got r={r}")
    return matrix


def _residual(matrix: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
              like: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    # (scaling * B) @ A, in the same order as PEFT, so fp32 results agree bit for bit.
    residual = matrix - scaling * lora_B @ lora_A
    residual = residual.to(like.dtype)
    return (residual.T if fan_in_fan_out else residual).contiguous()


def init_pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None,
               fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: W = U S V^T; A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), W_new = W - s B A.

    `niter` selects torch.svd_lowrank (randomized, uses the global RNG) with that many subspace
    iterations instead of the full SVD. Computed in fp32; A, B are fp32, W_new has W's dtype.
    """
    matrix = _as_out_in_fp32(weight, r, fan_in_fan_out, "PiSSA")
    if niter is None:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        Ur, Sr, Vr = torch.svd_lowrank(matrix, r, niter=niter)
        Sr, Vhr = Sr / scaling, Vr.t()
    root = torch.diag(torch.sqrt(Sr))
    lora_A = root @ Vhr
    lora_B = Ur @ root
    return lora_A, lora_B, _residual(matrix, lora_A, lora_B, scaling, weight, fan_in_fan_out)


def init_olora(weight: torch.Tensor, r: int, scaling: float,
               fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: W = Q R; B = Q[:, :r], A = R[:r], W_new = W - s B A (fp32 compute, W's dtype back).

    PEFT 0.21 decomposes a Conv1D weight without transposing it, which breaks (shape error, or a
    wrong output for square layers); here the [out, in] matrix is decomposed for both layouts.
    """
    matrix = _as_out_in_fp32(weight, r, fan_in_fan_out, "OLoRA")
    Q, R = torch.linalg.qr(matrix)
    lora_B, lora_A = Q[:, :r].contiguous(), R[:r].contiguous()
    return lora_A, lora_B, _residual(matrix, lora_A, lora_B, scaling, weight, fan_in_fan_out)


def initial_weights(
    init_lora_weights: bool | str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    r: int,
    scaling: float,
    base_weight: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(A, B, new base weight) for one adapter; None means "leave as created".

    `base_weight` is required for PiSSA / OLoRA (pass None from layers that cannot be decomposed,
    which then get a clear error).
    """
    spec = parse_init(init_lora_weights)
    if spec.kind == "none":
        return None, None, None
    if spec.kind == "default":
        return (*init_default(a_shape, b_shape), None)
    if spec.kind == "gaussian":
        return (*init_gaussian(a_shape, b_shape, r), None)
    if base_weight is None:
        raise ValueError(f"init_lora_weights={init_lora_weights!r} needs a Linear or Conv1D base layer")
    if spec.kind == "pissa":
        return init_pissa(base_weight, r, scaling, niter=spec.niter, fan_in_fan_out=fan_in_fan_out)
    return init_olora(base_weight, r, scaling, fan_in_fan_out=fan_in_fan_out)
