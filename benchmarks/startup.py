"""``stf bench startup``: what a one-shot process pays before and around its fusion.

Every measurement runs in fresh processes (``--repeat`` of each, the best kept), on one catalog
set (``--set``, default ``zhu_estarfm``) and one method (``--method``, default ``estarfm``):

* ``import``: ``import stf_pipeline`` inside the process;
* ``open``: the first :func:`stf_pipeline.open_catalog` of the set, read into memory;
* ``fuse, warm cache`` and ``fuse, cold cache``: the first :func:`stf_pipeline.fuse` of the
  catalog's task, with the Numba kernels already in the on-disk cache, and with an empty cache
  (``NUMBA_CACHE_DIR`` pointing at a new folder: every kernel compiles);
* ``whole process, warm cache`` and ``cold cache``: the wall time of a whole ``python`` process
  that opens the catalog, fuses and saves the prediction as a GeoTIFF, seen from outside
  (interpreter start and exit included).

Besides wall seconds, each row gives the CPU seconds of its processes (user + system, all
threads), a measure that other processes on a shared machine disturb less. Prints a table and
writes JSON (``--json``) with the machine description, the library versions and the records.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: libraries whose versions decide start-up cost
LIBRARIES = ("numpy", "numba", "llvmlite", "xarray", "dask", "rasterio", "scipy", "jax")

#: the one-shot process: open a catalog, fuse its task, save a GeoTIFF; prints phase times as JSON
_PROCESS = """
import json, sys, time
w0, c0 = time.perf_counter(), time.process_time()
times = {}
def mark(name):
    times[name] = (time.perf_counter() - w0, time.process_time() - c0)
import stf_pipeline as stf
mark("import")
cube, task = stf.open_catalog(sys.argv[1], chunks=None)
mark("open")
pred = stf.fuse(cube, task.target, method=sys.argv[2], pairs=list(task.pairs))
mark("fuse")
# sets without georeferencing (zhu_estarfm: no spatial_ref) get a placeholder CRS: the write is what is timed
pred.stf.to_geotiff(sys.argv[3], crs=None if "spatial_ref" in pred.coords else "EPSG:32650", overwrite=True)
mark("save")
print(json.dumps(times))
"""


def versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (absent ones left out) and of the package."""
    from stf_pipeline import __version__

    found = {"stf_pipeline": __version__}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _run(args: list[str], env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """Run the one-shot process; its wall and CPU seconds seen from outside, and its phase times."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PROCESS, *args], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the one-shot process failed: {tail[0]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(done.stdout.strip().splitlines()[-1])


def measure(catalog: str, method: str, repeat: int) -> list[dict[str, Any]]:
    """The records of the table (see module docstring): best wall and CPU seconds of ``repeat`` runs."""
    env = dict(os.environ)
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="stf-bench-startup-") as tmp:
        out = str(Path(tmp) / "fused.tif")
        _run([catalog, method, out], env)  # fills the Numba cache (and the OS file cache)
        for k in range(repeat):
            for cache in ("warm", "cold"):
                run_env = env if cache == "warm" else {**env, "NUMBA_CACHE_DIR": str(Path(tmp) / f"numba-{k}")}
                wall, cpu, phases = _run([catalog, method, out], run_env)
                previous: tuple[float, ...] = (0.0, 0.0)
                for phase in ("import", "open", "fuse"):
                    if phase != "fuse" and cache == "cold":
                        previous = tuple(phases[phase])
                        continue
                    label = f"fuse, {cache} cache" if phase == "fuse" else phase
                    now = tuple(phases[phase])
                    rows.setdefault(label, []).append((now[0] - previous[0], now[1] - previous[1]))
                    previous = now
                rows.setdefault(f"whole process, {cache} cache", []).append((wall, cpu))
    return [
        {
            "step": label,
            "wall_s": round(min(w for w, _ in runs), 3),
            "cpu_s": round(min(c for _, c in runs), 3),
            "runs": len(runs),
        }
        for label, runs in rows.items()
    ]


def _table(records: list[dict[str, Any]]) -> str:
    head = f"{'step':28s} {'wall s':>8s} {'CPU s':>8s}"
    lines = [head, "-" * len(head)]
    lines += [f"{r['step']:28s} {r['wall_s']:8.2f} {r['cpu_s']:8.2f}" for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="stf bench startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="zhu_estarfm", help="catalog set to open and fuse")
    parser.add_argument("--method", default="estarfm", help="fusion method")
    parser.add_argument("--repeat", type=int, default=3, help="processes per measurement (the best is kept)")
    parser.add_argument("--json", default="bench_startup.json", help="output JSON path")
    args = parser.parse_args(argv)

    from benchmarks._common import describe_machine, write_result

    info = {**describe_machine(with_jax=False), "versions": versions()}
    print(f"machine: {info}", flush=True)
    records = measure(args.set, args.method, max(1, args.repeat))
    print(_table(records))
    write_result(args.json, info, args, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
