"""What the side-by-side benchmarks (train_step.py, routes.py, quantized.py) share: running one
configuration in a fresh process of the same script, the machine description, the load
average, and the check that counting options are >= 1. Imported by name: each script's folder
is on sys.path when it runs."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def child_env(**extra: str) -> dict:
    """The environment of a fresh configuration process: offline, this checkout's peftkit first."""
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra)


def run_fresh(script: str, payload: dict, timeout: float, env: dict) -> dict:
    """`script --one PAYLOAD` in a fresh process: its last stdout line (JSON), or the error and
    the end of its stderr."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(payload)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                "stderr": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def answer_one(one: str, run_one, init=None) -> int:
    """The fresh process's side of `run_fresh`: run the configuration in `one` (JSON) with
    `run_one`, or `init` when the payload asks for the one-time setup, and print the JSON result."""
    payload = json.loads(one)
    if payload.get("init"):
        init(payload)
        print(json.dumps({"ok": True}))
    else:
        print(json.dumps(run_one(payload)))
    return 0


def loadavg() -> list[str] | None:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return None


def machine(packages: tuple[str, ...], cpu_flags: bool = False) -> dict:
    """Python, platform, CPUs, load, the CPU model (and its AVX/AMX flags), package versions."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg": loadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        info["cpu"] = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), None)
        if cpu_flags:
            flags = next((x.split(":", 1)[1].split() for x in lines if x.startswith("flags")), [])
            info["avx_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx")))
    except OSError:
        pass
    for name in packages:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def below_one(args, names: tuple[str, ...]) -> list[str]:
    """"--name=value must be >= 1" for each option in `names` that is set and below 1."""
    return [f"--{k.replace('_', '-')}={getattr(args, k)} must be >= 1" for k in names
            if getattr(args, k) is not None and getattr(args, k) < 1]
