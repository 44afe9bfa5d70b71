"""``stf bench compile``: what compiling costs the first Zarr -> Zarr fuse of a scene.

For each JAX-backed method (``--methods``, ``name:backend``), a synthetic scene (``--size``, 6
bands) is written to Zarr in ``--chunk``-pixel chunks and fused Zarr -> Zarr (open the store, fuse
the middle date, write the prediction to a new store) in fresh processes:

* ``first``: the first fuse of a fresh process with an empty compilation cache (every program
  compiles);
* ``warm``: a second fuse of the same scene in that process (nothing compiles);
* ``disk``: the first fuse of another fresh process, with the persistent compilation cache that
  the first process filled (``JAX_COMPILATION_CACHE_DIR``; programs that took JAX's
  ``jax_persistent_cache_min_compile_time_secs`` or longer to compile are loaded from it);
* ``ready``: as ``disk``, in a third fresh process that started JAX's backend (``jax.devices()``,
  the CUDA context on a GPU) before the fuse, as a notebook or a Dask worker with JAX already
  running would have: what the first fuse of a scene costs beyond the process's start-up;
* ``unpadded``: as ``first``, with the method's block padding off (``block_padding="none"``: one
  program per block shape), unless ``--skip-unpadded``.

BiaSTF fuses with a multiband model of the paper's size (``--biastf-filters``, 128 filters per
layer) and random weights (:func:`benchmarks.biastf.random_model`: neither the compile cost nor
the speed depends on the weights), so ``warm`` is what the issue's target compares with.

Each row gives the wall seconds, the ratios ``first / warm``, ``disk / warm`` and ``ready / warm``,
and the XLA programs each run compiled and loaded from the disk cache (JAX's compilation events);
the JSON also has the seconds JAX's backend spent on them in the first and the disk run
(``compile_s_first``, ``compile_s_disk``). Prints a table and writes JSON (``--json``) with the
machine description and the records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

#: the parameter of STARFM and ESTARFM that ``--half-window`` sets (25: a 51 x 51 window, as in ``stf bench methods``)
WINDOW_PARAM: dict[str, str] = {"starfm": "radius", "estarfm": "half_window"}

#: one fresh process: fuse the store twice (``first``, ``warm``), counting XLA compilations; prints JSON
_PROCESS = """
import dataclasses, json, sys, time
from jax import monitoring
job = json.loads(sys.argv[1])
counts = {"compiled": 0, "from_cache": 0, "compile_s": 0.0}
def on_duration(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        counts["compiled"] += 1
        counts["compile_s"] += duration
def on_event(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["from_cache"] += 1
monitoring.register_event_duration_secs_listener(on_duration)
monitoring.register_event_listener(on_event)
import stf_pipeline as stf
if job.get("ready"):
    import jax
    jax.devices()
method = stf.get_method(job["method"])
if not job["pad"]:
    method = dataclasses.replace(method, block_padding="none", kernel=None)
model = stf.load_model(job["model"]) if job["model"] else None
out = {}
for run in ("first", "warm"):
    counts.update(compiled=0, from_cache=0, compile_s=0.0)
    start = time.perf_counter()
    cube = stf.open_cube(job["store"])
    pred = stf.fuse(cube, cube.time.values[1], method=method, backend=job["backend"], model=model, **job["params"])
    ds = pred.to_dataset()
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(job["out"] + "-" + run, mode="w", zarr_format=2)
    out[run] = {"wall_s": time.perf_counter() - start, **counts}
print(json.dumps(out))
"""


def _fresh_process(job: dict[str, Any], cache_dir: Path, environ: dict[str, str]) -> dict[str, Any]:
    """Run :data:`_PROCESS` for ``job`` in ``environ`` with ``cache_dir`` as JAX's compilation cache."""
    env = {**environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
    env.pop("STF_JAX_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", _PROCESS, json.dumps(job)], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the fuse process for {job['method']}:{job['backend']} failed: {tail[0]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _biastf_model(filters: int, path: Path) -> str:
    """A multiband BiaSTF model of ``filters`` per layer with random weights, six bands, coarse factor 20
    (the synthetic scene's), saved at ``path``."""
    from benchmarks.biastf import random_model

    shape = argparse.Namespace(filters=filters, steps=1, batch_size=1, patch_size=32)
    random_model(shape, multiband=True).save(path)
    return str(path)


def measure(
    methods: list[str],
    size: int,
    chunk: int,
    *,
    half_window: int,
    unpadded: bool,
    biastf_filters: int = 128,
    environ: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One record per ``name:backend`` of ``methods`` (see the module docstring); the fresh processes
    run in ``environ`` (default this process's environment)."""
    import stf_pipeline as stf

    environ = dict(os.environ if environ is None else environ)
    records = []
    with tempfile.TemporaryDirectory(prefix="stf-bench-compile-") as tmp:
        root = Path(tmp)
        cube = stf.synthetic_scene(size, size, n_times=4, seed=0, fine_times=[0, 2, 3]).load()
        store = stf.write_cube(cube, root / "in.zarr", chunks={"y": chunk, "x": chunk})
        model_path = None
        for spec in methods:
            name, _, backend = spec.partition(":")
            backend = backend or "auto"
            if name == "biastf" and model_path is None:
                model_path = _biastf_model(biastf_filters, root / "biastf.model")
            params = {WINDOW_PARAM[name]: half_window} if name in WINDOW_PARAM else {}
            job = {
                "method": name, "backend": backend, "params": params, "store": str(store),
                "model": model_path if name == "biastf" else None, "out": str(root / f"out-{name}-{backend}"),
                "pad": True,
            }
            cache = root / f"jax-cache-{name}-{backend}"
            try:
                cold = _fresh_process(job, cache, environ)
                disk = _fresh_process(job, cache, environ)
                ready = _fresh_process({**job, "ready": True}, cache, environ)
            except RuntimeError as err:  # e.g. a backend this machine lacks: report it, go on
                records.append({"method": name, "backend": backend, "error": str(err)[:300]})
                print(f"  {records[-1]}", flush=True)
                continue
            warm = cold["warm"]["wall_s"]
            record: dict[str, Any] = {
                "method": name,
                "backend": backend,
                "padding": stf.get_method(name).padding_for(backend),
                "first_s": round(cold["first"]["wall_s"], 3),
                "warm_s": round(warm, 3),
                "disk_s": round(disk["first"]["wall_s"], 3),
                "first_over_warm": round(cold["first"]["wall_s"] / warm, 2),
                "disk_over_warm": round(disk["first"]["wall_s"] / warm, 2),
                "ready_s": round(ready["first"]["wall_s"], 3),
                "ready_over_warm": round(ready["first"]["wall_s"] / warm, 2),
                "compiled_first": cold["first"]["compiled"] - cold["first"]["from_cache"],
                "compiled_warm": cold["warm"]["compiled"] - cold["warm"]["from_cache"],
                "compiled_disk": disk["first"]["compiled"] - disk["first"]["from_cache"],
                "from_disk": disk["first"]["from_cache"],
                "compile_s_first": round(cold["first"]["compile_s"], 3),
                "compile_s_disk": round(disk["first"]["compile_s"], 3),
            }
            if unpadded and record["padding"] != "none":
                bare = _fresh_process({**job, "pad": False}, root / f"jax-cache-{name}-{backend}-unpadded", environ)
                record["unpadded_first_s"] = round(bare["first"]["wall_s"], 3)
                record["compiled_unpadded"] = bare["first"]["compiled"] - bare["first"]["from_cache"]
            records.append(record)
            print(f"  {record}", flush=True)
    return records


def _table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':16s} {'padding':8s} {'first s':>8s} {'warm s':>8s} {'disk s':>8s} {'first/warm':>10s} "
        f"{'disk/warm':>9s} {'ready/warm':>10s} {'compiles (first/warm/disk)':>27s} {'unpadded first s':>17s}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        if "error" in r:
            lines.append(f"{r['method'] + ':' + r['backend']:16s} {r['error']}")
            continue
        compiles = f"{r['compiled_first']}/{r['compiled_warm']}/{r['compiled_disk']}"
        bare = f"{r['unpadded_first_s']:.2f} ({r['compiled_unpadded']})" if "unpadded_first_s" in r else "-"
        lines.append(
            f"{r['method'] + ':' + r['backend']:16s} {r['padding']:8s} {r['first_s']:8.2f} {r['warm_s']:8.2f} "
            f"{r['disk_s']:8.2f} {r['first_over_warm']:10.2f} {r['disk_over_warm']:9.2f} {r['ready_over_warm']:10.2f} "
            f"{compiles:>27s} {bare:>17s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="stf bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", nargs="+", default=["starfm:jax", "estarfm:jax", "biastf:jax"],
        help="method:backend to fuse (backend auto when left out); e.g. starfm:pallas on a GPU",
    )
    parser.add_argument("--size", type=int, default=2000, help="scene side in fine pixels")
    parser.add_argument("--chunk", type=int, default=1024, help="spatial chunk of the stores in pixels")
    parser.add_argument("--half-window", type=int, default=25, help="STARFM's radius and ESTARFM's half_window")
    parser.add_argument(
        "--biastf-filters", type=int, default=128, help="filters per layer of BiaSTF's model (128: the paper's)"
    )
    parser.add_argument("--skip-unpadded", action="store_true", help="leave out the runs without block padding")
    parser.add_argument("--json", default="bench_compile.json", help="output JSON path")
    args = parser.parse_args(argv)

    # this process builds BiaSTF's model on the device: it takes what it uses, not the preallocated share a
    # GPU process takes by default, so that the fresh processes (in the caller's environment) get the memory
    environ = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from benchmarks._common import describe_machine, write_result
    from benchmarks.startup import versions

    info = {**describe_machine(), "versions": versions()}
    print(f"machine: {info}", flush=True)
    records = measure(
        args.methods, args.size, args.chunk, half_window=args.half_window, unpadded=not args.skip_unpadded,
        biastf_filters=args.biastf_filters, environ=environ,
    )
    print(_table(records))
    write_result(args.json, info, args, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
