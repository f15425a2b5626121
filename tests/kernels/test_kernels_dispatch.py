"""The fast-path switches: one per op and one over all of them."""
from __future__ import annotations

import importlib

import pytest
import torch

from peftkit.kernels import (
    FAST_PATHS,
    attention,
    attention_reference,
    dora_weight_norm,
    dora_weight_norm_reference,
    fast_paths,
    fast_paths_enabled,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    lora_linear,
    lora_linear_reference,
    set_fast_path,
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


def test_each_op_has_its_own_switch():
    x, w, b, A, B = lora_args()
    h, labels = torch.randn(4, 8, requires_grad=True), torch.tensor([1, 2, -100, 0])
    q = k = v = torch.randn(1, 2, 3, 4)
    assert all(fast_paths_enabled(op) for op in FAST_PATHS)
    with fast_paths(False, "lora_linear", "attention"):
        assert not fast_paths_enabled("lora_linear") and not fast_paths_enabled("attention")
        assert fast_paths_enabled("linear_cross_entropy") and fast_paths_enabled()
        assert type(lora_linear(x, w, b, A, B, 1.0).grad_fn) is type(lora_linear_reference(x, w, b, A, B, 1.0).grad_fn)
        assert "LinearCrossEntropyFn" in type(linear_cross_entropy(h, w, labels).grad_fn).__name__
        assert torch.equal(attention(q, k, v), attention_reference(q, k, v, None, 4 ** -0.5))
    assert all(fast_paths_enabled(op) for op in FAST_PATHS)
    set_fast_path("dora_weight_norm", False)
    try:
        assert not fast_paths_enabled("dora_weight_norm")
        with fast_paths(False):  # the global switch wins over the ops' own
            assert not fast_paths_enabled("lora_linear")
        assert torch.equal(dora_weight_norm(w, A, B, 1.0), dora_weight_norm_reference(w, A, B, 1.0))
    finally:
        set_fast_path("dora_weight_norm", True)


def test_switches_reject_unknown_names():
    with pytest.raises(ValueError, match="unknown fast path 'lora'; the fast paths are .*'lora_linear'"):
        set_fast_path("lora", False)
    with pytest.raises(ValueError, match="unknown fast path 'attn'"):
        fast_paths_enabled("attn")
    with pytest.raises(ValueError, match="unknown fast path 'attn'"):
        with fast_paths(False, "attn"):
            pass
    with pytest.raises(TypeError, match="set_fast_paths expects a bool, got 0"):
        set_fast_paths(0)
    with pytest.raises(TypeError, match="set_fast_path\\('attention', ...\\) expects a bool, got 'off'"):
        set_fast_path("attention", "off")


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("off", False), ("1", True), ("Yes", True), ("", True)])
def test_environment_variable(monkeypatch, raw, expected):
    monkeypatch.setenv("PEFTKIT_FAST_PATHS", raw)
    assert dispatch._initial_state() == (expected, dict.fromkeys(FAST_PATHS, True))


def test_environment_variable_per_op(monkeypatch):
    monkeypatch.setenv("PEFTKIT_FAST_PATHS", " -attention, -lora_linear,+dora_weight_norm")
    enabled, ops = dispatch._initial_state()
    assert enabled and ops == {"lora_linear": False, "linear_cross_entropy": True, "dora_weight_norm": True,
                               "attention": False}


@pytest.mark.parametrize("raw", ["maybe", "-attn", "attention,-lora_linear", "-attention,"])
def test_environment_variable_typo(monkeypatch, raw):
    monkeypatch.setenv("PEFTKIT_FAST_PATHS", raw)
    with pytest.raises(ValueError, match="PEFTKIT_FAST_PATHS=.* is not understood"):
        dispatch._initial_state()
