"""The dropout mask's C kernels against its torch implementation (bit for bit), and the build."""
import shutil
import warnings

import pytest
import torch

from peftkit.kernels import _native, dropout_keep_mask
from peftkit.kernels import dropout_mask as dm

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _all_ops(monkeypatch, native: bool, x, t, acc, seed, p):
    monkeypatch.setenv("PEFTKIT_NATIVE_KERNELS", "1" if native else "0")
    assert (dm._kernels_for(x) is not None) == (native and x.dtype in (torch.float32, torch.bfloat16))
    xk, packed = dm.draw_and_apply(x, seed, p)
    xk = xk.clone()
    applied = dm.apply_mask(t, packed).clone()
    summed = dm.add_masked_(acc.clone(), t, packed)
    return xk, packed, applied, summed


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 517), (70001,)])  # 70001: threaded, odd tail
@pytest.mark.parametrize("p", [0.1, 0.5, 1e-6])
@pytest.mark.parametrize("threads", [1, 2])
def test_c_kernels_equal_the_torch_implementation_bit_for_bit(monkeypatch, dtype, shape, p, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(hash((shape, p)) % 1000)
        x, t, acc = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
        x.view(-1)[0] = -x.view(-1)[0].abs()  # a negative value: dropped, it must give -0.0 as torch does
        seed = 2**61 + 12345
        native = _all_ops(monkeypatch, True, x, t, acc, seed, p)
        portable = _all_ops(monkeypatch, False, x, t, acc, seed, p)
    finally:
        torch.set_num_threads(previous)
    for name, a, b in zip(("x·mask", "packed", "apply_mask", "add_masked_"), native, portable):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(_bits(a) if a.is_floating_point() else a, _bits(b) if b.is_floating_point() else b), name
    keep = dropout_keep_mask(seed, shape, p, "cpu")
    assert torch.equal(native[0], x * keep)
    assert torch.equal(native[3], acc + t * keep)
    if p == 0.5:
        assert 0.4 < keep.float().mean() < 0.6 or keep.numel() < 50


@needs_cc
def test_fp16_and_strided_inputs_take_the_torch_path(monkeypatch):
    monkeypatch.setenv("PEFTKIT_NATIVE_KERNELS", "1")
    half = torch.randn(4, 9, dtype=torch.float16)
    strided = torch.randn(9, 4).t()
    assert dm._kernels_for(half) is None and dm._kernels_for(strided) is None
    for x in (half, strided):
        xk, packed = dm.draw_and_apply(x, 77, 0.25)
        xk = xk.clone()  # a scratch buffer, reused by the next mask call
        keep = dropout_keep_mask(77, x.shape, 0.25, "cpu")
        assert torch.equal(xk, x * keep)
        assert torch.equal(dm.apply_mask(x, packed), x * keep)


def test_everything_dropped_and_nothing_dropped(monkeypatch):
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    xk, packed = dm.draw_and_apply(x, 3, 1.0)
    assert not xk.any() and not packed.any()
    xk, packed = dm.draw_and_apply(x, 3, 1e-9)  # rounds to 0 of 2^16: all kept
    assert torch.equal(xk, x) and bool((packed == 15).all())


@needs_cc
def test_the_build_is_cached_and_shared(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", {})
    assert _native.load("dropout_mask") is not None
    built = list((tmp_path / "native").glob("dropout_mask-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(_native, "_loaded", {})
    assert _native.load("dropout_mask") is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in (tmp_path / "native").iterdir()] == [built[0].name]  # no partial files left


def test_without_a_compiler_it_warns_once_and_uses_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(_native, "_loaded", {})
    x = torch.randn(6, 10)
    with pytest.warns(RuntimeWarning, match=r"no C compiler '/nonexistent/cc'.*torch implementation"):
        xk, packed = dm.draw_and_apply(x, 5, 0.3)
    xk = xk.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.draw_and_apply(x, 5, 0.3)  # no second warning
    assert torch.equal(xk, x * dropout_keep_mask(5, (6, 10), 0.3, "cpu"))


def test_a_failing_build_names_the_compiler_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.setattr(_native, "_loaded", {})
    with pytest.warns(RuntimeWarning, match=r"'?false'? failed \(1\)"):
        assert _native.load("dropout_mask") is None


def test_native_switch_is_validated(monkeypatch):
    monkeypatch.setenv("PEFTKIT_NATIVE_KERNELS", "maybe")
    with pytest.raises(ValueError, match="PEFTKIT_NATIVE_KERNELS='maybe'"):
        _native.load("dropout_mask")


@needs_cc
def test_flags_the_compiler_refuses_fall_back_to_a_portable_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_native, "_loaded", {})
    portable = ["-O3", "-shared", "-fPIC", "-std=c11"]
    monkeypatch.setattr(_native, "_flag_sets", lambda: [[*portable, "-fno-such-flag-peftkit"], portable])
    assert _native.load("dropout_mask") is not None
    x = torch.randn(33, 65, dtype=torch.bfloat16)
    xk, packed = dm.draw_and_apply(x, 9, 0.2)
    assert dm._kernels_for(x) is not None
    assert torch.equal(xk, x * dropout_keep_mask(9, x.shape, 0.2, "cpu"))


def test_a_mismatched_mask_or_accumulator_is_refused_before_any_kernel_runs():
    x = torch.randn(8, 8)
    _, packed = dm.draw_and_apply(x, 1, 0.5)
    with pytest.raises(ValueError, match=r"uint8 tensor of >= 32 bytes for 128 elements, got \(16,\)"):
        dm.apply_mask(torch.randn(16, 8), packed)
    with pytest.raises(ValueError, match="same shape and dtype"):
        dm.add_masked_(torch.zeros(8, 8, dtype=torch.bfloat16), x, packed)


@needs_cc
@pytest.mark.skipif(not _native._torch_uses_openmp() or not __import__("os").path.exists("/proc/self/maps"),
                    reason="torch without OpenMP, or no /proc")
def test_the_kernels_share_torchs_openmp_runtime():
    """Two OpenMP runtimes in one process would be two thread pools spinning against each other."""
    assert _native.load("dropout_mask") is not None
    dm.draw_and_apply(torch.randn(300, 300), 3, 0.1)  # a threaded call
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(runtimes) == 1, runtimes
