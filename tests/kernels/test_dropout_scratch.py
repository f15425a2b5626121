"""The dropout mask's per-thread scratch buffers stay within SCRATCH_CAP_BYTES after a call, and
a fresh (huge-page) buffer computes what a kept one does."""
import threading

import pytest
import torch

from peftkit.kernels import dropout_keep_mask
from peftkit.kernels import _scratch
from peftkit.kernels import dropout_mask as dm


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch-ops"])
def test_a_large_call_leaves_at_most_the_cap_held(monkeypatch, native):
    monkeypatch.setenv("PEFTKIT_NATIVE_KERNELS", "1" if native else "0")
    x = torch.randn(4096, 2048)  # 32 MiB: x·mask and the backward's buffer held 64 MiB before the cap
    xk, packed = dm.draw_and_apply(x, 5, 0.1)
    applied = dm.apply_mask(x, packed)
    dm.add_masked_(torch.zeros_like(x), x, packed)
    assert _scratch.scratch_bytes_held("dropout") <= _scratch.SCRATCH_CAP_BYTES == 8 << 20
    keep = dropout_keep_mask(5, x.shape, 0.1, "cpu")
    assert torch.equal(xk, x * keep) and torch.equal(applied, x * keep)
    assert _scratch.scratch_bytes_held("dropout") <= _scratch.SCRATCH_CAP_BYTES


def test_small_buffers_are_reused_and_each_thread_has_its_own(monkeypatch):
    monkeypatch.setenv("PEFTKIT_NATIVE_KERNELS", "0")
    x = torch.randn(64, 32)
    first, packed = dm.draw_and_apply(x, 1, 0.5)
    pointer = first.data_ptr()
    again, _ = dm.draw_and_apply(x, 2, 0.5)
    assert again.data_ptr() == pointer  # a kept buffer: no page faults per call
    held = {}
    thread = threading.Thread(target=lambda: held.update(other=_scratch.scratch_bytes_held()))
    thread.start()
    thread.join()
    assert held["other"] == 0 < _scratch.scratch_bytes_held()


def test_fresh_huge_page_buffers_are_ordinary_tensors():
    t = _scratch.empty(3 << 20, torch.float32, "cpu")  # 12 MiB: mapped with huge pages where offered
    assert t.shape == (3 << 20,) and t.dtype == torch.float32
    t.fill_(2.0)
    out = torch.mm(torch.ones(1, 4), torch.ones(4, 1), out=t[:1].view(1, 1))
    assert float(out) == 4.0 and float(t[1]) == 2.0
