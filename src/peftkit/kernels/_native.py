"""Small C kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

Some CPU work is a chain of cheap elementwise steps (the dropout mask: ~20 integer ops per
element). As separate torch ops each step is a full pass over memory and, with more than one
thread, a fork/join of the thread pool; one C loop does the chain in a single pass. The source
sits next to this module (`<name>.c`, plain C, no torch headers, so a build takes ~0.1 s) and is
built with `-O3 -march=native` into a cache folder keyed by the source, the flags and the CPU.

OpenMP: where torch's own thread pool is OpenMP (Linux wheels), the library is built with
-fopenmp and links the libgomp torch already loaded (same soname), so both share one pool.

Every caller keeps a torch implementation: `load` returns None (with one warning) when there
is no compiler or the build fails, and PEFTKIT_NATIVE_KERNELS=0 turns the C kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ._dispatch import env_switch

__all__ = ["load", "native_kernels_enabled", "omp_threads"]

_SOURCE_DIR = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def native_kernels_enabled() -> bool:
    """False when PEFTKIT_NATIVE_KERNELS is 0/false/no/off (read at each call)."""
    return env_switch("PEFTKIT_NATIVE_KERNELS")


def _torch_uses_openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def omp_threads() -> int:
    """Threads a kernel call may use: torch's intra-op thread count."""
    return torch.get_num_threads()


def _cpu_signature() -> str:
    # -march=native ties the binary to the CPU's instruction sets: a cache shared between
    # different machines must not hand one machine the other's build.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("PEFTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "peftkit"
    )
    return Path(root) / "native"


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, fastest first; the portable set is for compilers that refuse
    -march=native or -fopenmp (Apple clang), where the kernels then run on one thread."""
    base = ["-O3", "-shared", "-fPIC", "-std=c11"]
    fast = [*base, "-march=native"] + (["-fopenmp"] if _torch_uses_openmp() else [])
    return [fast, base]


def _build(name: str) -> Path:
    source = (_SOURCE_DIR / f"{name}.c").read_text()
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC to one)")
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "peftkit-native"
        folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([source, compiler, *flags, _cpu_signature()]).encode()).hexdigest()[:16]
        target = folder / f"{name}-{key}.so"
        if target.exists():
            return target
        try:
            _compile(source, name, compiler, flags, target)
            return target
        except RuntimeError as exc:
            errors.append(str(exc))
    raise RuntimeError(errors[0])


def _compile(source: str, name: str, compiler: str, flags: list[str], target: Path) -> None:
    # Build under a unique name, then rename: processes building at once never load a half file.
    fd, partial = tempfile.mkstemp(suffix=".so", prefix=f"{name}-", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src_path = Path(tmp) / f"{name}.c"
            src_path.write_text(source)
            done = subprocess.run(
                [compiler, *flags, str(src_path), "-o", partial], capture_output=True, text=True, timeout=120
            )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def load(name: str) -> ctypes.CDLL | None:
    """The compiled library of `<name>.c` (built once per machine), or None where native kernels
    are off or cannot be built. Thread-safe; each name is built and loaded at most once."""
    if not native_kernels_enabled():
        return None
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = ctypes.CDLL(str(_build(name)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                warnings.warn(
                    f"peftkit: the C kernels of {name}.c are unavailable ({exc}); using the torch "
                    "implementation instead (same results, slower on CPU)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _loaded[name] = None
        return _loaded[name]
