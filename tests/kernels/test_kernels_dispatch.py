"""The fast-path switch and the per-device kernel registry."""
from __future__ import annotations

import importlib

import pytest
import torch

from peftkit.kernels import (
    dora_weight_norm,
    dora_weight_norm_reference,
    fast_paths,
    fast_paths_enabled,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    lora_linear,
    lora_linear_reference,
    register_kernel,
    set_fast_paths,
)

dispatch = importlib.import_module("peftkit.kernels._dispatch")


def lora_args():
    x = torch.randn(5, 8, requires_grad=True)
    return x, torch.randn(6, 8), None, torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True)


def test_default_is_enabled_and_context_manager_restores():
    assert fast_paths_enabled()
    with pytest.raises(RuntimeError):
        with fast_paths(False):
            assert not fast_paths_enabled()
            raise RuntimeError("inside")
    assert fast_paths_enabled()


def test_disabled_switch_runs_the_reference():
    x, w, b, A, B = lora_args()
    assert "LoraLinearFn" in type(lora_linear(x, w, b, A, B, 1.0).grad_fn).__name__
    h, labels = torch.randn(4, 8, requires_grad=True), torch.tensor([1, 2, -100, 0])
    assert "LinearCrossEntropyFn" in type(linear_cross_entropy(h, w, labels).grad_fn).__name__
    with fast_paths(False):
        y = lora_linear(x, w, b, A, B, 1.0)
        loss = linear_cross_entropy(h, w, labels)
    for out, plain in ((y, lora_linear_reference(x, w, b, A, B, 1.0)), (loss, linear_cross_entropy_reference(h, w, labels))):
        assert type(out.grad_fn) is type(plain.grad_fn)
        assert torch.equal(out, plain)
    set_fast_paths(False)
    try:
        assert not fast_paths_enabled()
    finally:
        set_fast_paths(True)


def test_registered_kernel_is_used_only_with_fast_paths():
    calls = []

    def spy_lora(*args):
        calls.append("lora_linear")
        return lora_linear_reference(*args[:-1])  # drop dropout_seed (None) — same math

    def spy_ce(*args):
        calls.append("linear_cross_entropy")
        return linear_cross_entropy_reference(*args)

    def spy_dora(*args):
        calls.append("dora_weight_norm")
        return dora_weight_norm_reference(*args)

    spies = {"lora_linear": spy_lora, "linear_cross_entropy": spy_ce, "dora_weight_norm": spy_dora}
    x, w, b, A, B = lora_args()
    h, labels = torch.randn(4, 8), torch.tensor([1, 2, -100, 0])
    try:
        for op, fn in spies.items():
            register_kernel(op, "cpu", fn)
        lora_linear(x, w, b, A, B, 1.0)
        linear_cross_entropy(h, w, labels)
        dora_weight_norm(w, A, B, 1.0)
        assert calls == ["lora_linear", "linear_cross_entropy", "dora_weight_norm"]
        with fast_paths(False):
            lora_linear(x, w, b, A, B, 1.0)
            linear_cross_entropy(h, w, labels)
            dora_weight_norm(w, A, B, 1.0)
        assert len(calls) == 3
    finally:
        for op in spies:
            register_kernel(op, "cpu", None)
    lora_linear(x, w, b, A, B, 1.0)
    assert len(calls) == 3


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown kernel op 'lora'.*'lora_linear'"):
        register_kernel("lora", "cuda", lambda *a: None)
    with pytest.raises(ValueError, match="device_type must be a device type.*got 'cuda:0'"):
        register_kernel("lora_linear", "cuda:0", lambda *a: None)
    with pytest.raises(TypeError, match="set_fast_paths expects a bool, got 0"):
        set_fast_paths(0)


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("off", False), ("1", True), ("Yes", True), ("", True)])
def test_environment_variable(monkeypatch, raw, expected):
    monkeypatch.setenv("PEFTKIT_FAST_PATHS", raw)
    assert dispatch._initial_state() is expected


def test_environment_variable_typo(monkeypatch):
    monkeypatch.setenv("PEFTKIT_FAST_PATHS", "maybe")
    with pytest.raises(ValueError, match="PEFTKIT_FAST_PATHS='maybe' is not understood"):
        dispatch._initial_state()
