"""What every benchmark shares: the machine description written next to its numbers, best-of-n timing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: the clone's root: the folder that holds ``benchmarks/`` and ``stf_pipeline/``
ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """``name, memory`` of each NVIDIA GPU (empty without ``nvidia-smi``)."""
    if not shutil.which("nvidia-smi"):
        return []
    query = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in query.stdout.splitlines() if line.strip()]


def describe_machine(*, with_jax: bool = True) -> dict[str, Any]:
    """CPU, cores, memory, GPUs, load average, Python and (optionally) JAX backend and devices."""
    from stf_pipeline.cluster import machine_cores, machine_memory

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": machine_cores(),
        "memory_gib": round(machine_memory() / 2**30, 1),
        "gpus": gpu_names(),
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()),
    }
    if with_jax:
        import jax

        info.update(
            jax=jax.__version__,
            jax_backend=jax.default_backend(),
            devices=[getattr(d, "device_kind", str(d)) for d in jax.devices()],
        )
    return info


def best_wall_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def child_command(name: str, *args: str, env: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run benchmark ``name`` with ``args`` in a fresh Python process.

    The child runs ``python -m benchmarks.NAME`` with the clone's root first on ``PYTHONPATH``, so it
    finds this folder (which is not installed with the package) and the clone's ``stf_pipeline``.
    ``env`` (default: this process's environment) is the rest of its environment.
    """
    child = dict(os.environ if env is None else env)
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-m", f"benchmarks.{name}", *args], child


def write_result(
    path: str | os.PathLike[str], info: Mapping[str, Any], args: Any, records: list[Any], *, quiet: bool = False
) -> None:
    """Write a benchmark's JSON: the machine (with the load average at the end of the run, since
    the timings of a shared machine depend on it), the arguments and the records; says where
    unless ``quiet`` (a rewrite after each record, so that a run cut short keeps what it measured)."""
    result = {"machine": {**info, "loadavg_end": list(os.getloadavg())}, "args": vars(args), "results": records}
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    if not quiet:
        print(f"wrote {path}")
