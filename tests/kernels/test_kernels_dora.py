"""dora_weight_norm (expanded, never forms W + sBA) against forming the matrix."""
from __future__ import annotations

import importlib

import pytest
import torch

from peftkit.kernels import dora_weight_norm, dora_weight_norm_reference, weight_row_sq_norm

OUT, IN, R = 48, 40, 6

dora_module = importlib.import_module("peftkit.kernels.dora")


def make(dtype=torch.float32, fan_in_fan_out=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g, dtype=torch.float64) / IN**0.5
    A = torch.randn(R, IN, generator=g, dtype=torch.float64) / IN**0.5
    B = torch.randn(OUT, R, generator=g, dtype=torch.float64) / R**0.5
    w = w.t().contiguous() if fan_in_fan_out else w
    return w.to(dtype), A.float(), B.float()


def truth(w, A, B, s, fan_in_fan_out=False):
    """The norm in fp64 of the exact values given (whatever their dtype)."""
    return dora_weight_norm_reference(w.double(), A.double(), B.double(), s, fan_in_fan_out=fan_in_fan_out)


def rel_err(got, want):
    return ((got.double() - want) / want).abs().max().item()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("scaling", [0.5, 4.0])
def test_fp32_matches_reference(fan_in_fan_out, scaling):
    w, A, B = make(fan_in_fan_out=fan_in_fan_out)
    fast = dora_weight_norm(w, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    ref = dora_weight_norm_reference(w, A, B, scaling, fan_in_fan_out=fan_in_fan_out)
    assert fast.shape == (OUT,) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=0)
    cached = weight_row_sq_norm(w, fan_in_fan_out)
    torch.testing.assert_close(dora_weight_norm(w, A, B, scaling, cached, fan_in_fan_out), fast, rtol=1e-6, atol=0)


def test_matches_peft_weight_norm():
    from peft.tuners.lora.dora import DoraLinearLayer

    w, A, B = make()
    want = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(w, B @ A, 2.0)
    torch.testing.assert_close(dora_weight_norm(w, A, B, 2.0), want, rtol=1e-5, atol=0)


def test_near_cancellation_stays_accurate():
    # Rows of W almost cancel s·BA (norm ~1e-3 of either): the expansion alone would lose all
    # digits there; those rows are recomputed, and the result is fp64-accurate to 1e-5.
    w, A, B = make()
    s = 3.0
    w = -s * (B @ A) + 1e-3 * w
    w[::2] = torch.randn(OUT // 2, IN, generator=torch.Generator().manual_seed(3))  # well-conditioned rows too
    want = truth(w, A, B, s)
    assert rel_err(dora_weight_norm(w, A, B, s), want) < 1e-5
    assert rel_err(dora_weight_norm(w, A, B, s, weight_row_sq_norm(w)), want) < 1e-5
    w_t = w.t().contiguous()
    assert rel_err(dora_weight_norm(w_t, A, B, s, fan_in_fan_out=True), want) < 1e-5


def test_rows_of_very_different_scale():
    w, A, B = make()
    w = w * torch.logspace(-4, 4, OUT)[:, None]
    B = B * torch.logspace(4, -4, OUT)[:, None]
    want = truth(w, A, B, 2.0)
    assert rel_err(dora_weight_norm(w, A, B, 2.0), want) < 1e-5


def test_bf16_weight_accumulates_in_fp32():
    # The bf16 weight is upcast, not multiplied in bf16: the result is as accurate as fp32
    # arithmetic on the bf16 values (a bf16 computation would be off by ~1e-3).
    w, A, B = make(dtype=torch.bfloat16)
    fast = dora_weight_norm(w, A, B, 4.0)
    assert fast.dtype == torch.float32
    assert rel_err(fast, truth(w, A, B, 4.0)) < 1e-5


def test_blocked_passes_match(monkeypatch):
    # Tiny row blocks: W Aᵀ and ||W_i||² are accumulated over several blocks.
    monkeypatch.setattr(dora_module, "_BLOCK_ELEMENTS", 3 * IN + 5)
    for fan_in_fan_out in (False, True):
        w, A, B = make(dtype=torch.bfloat16, fan_in_fan_out=fan_in_fan_out)
        want = truth(w, A, B, 1.5, fan_in_fan_out)
        assert rel_err(dora_weight_norm(w, A, B, 1.5, fan_in_fan_out=fan_in_fan_out), want) < 1e-5
        torch.testing.assert_close(
            weight_row_sq_norm(w, fan_in_fan_out).double(),
            (w.double().t() if fan_in_fan_out else w.double()).square().sum(1),
            rtol=1e-6,
            atol=0,
        )


def test_detached_even_for_trainable_adapters():
    w, A, B = make()
    A.requires_grad_()
    B.requires_grad_()
    assert not dora_weight_norm(w, A, B, 1.0).requires_grad
    assert not dora_weight_norm_reference(w, A, B, 1.0).requires_grad


def test_zero_lora_b_gives_the_weight_norm():
    w, A, B = make()
    torch.testing.assert_close(dora_weight_norm(w, A, torch.zeros_like(B), 2.0), w.norm(dim=1), rtol=1e-6, atol=0)


def test_bad_arguments():
    w, A, B = make()
    with pytest.raises(ValueError) as err:
        dora_weight_norm(w, A[:, :-1], B[:-1], "2", torch.ones(3))
    msg = str(err.value)
    for part in (f"lora_A must be [r, {IN}]", f"lora_B must be [{OUT}, {R}], got ({OUT - 1}, {R})",
                 f"weight_sq_norm must be None or a [{OUT}] tensor", "scaling must be a Python float, got '2'"):
        assert part in msg, part
    with pytest.raises(ValueError, match="weight must be a 2-D floating-point tensor"):
        weight_row_sq_norm(torch.ones(3, dtype=torch.long))
