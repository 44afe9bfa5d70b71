"""``stf bench methods``: seconds and peak memory of every fusion method.

For each method of :func:`stf_pipeline.methods.available_methods` and each input, a fresh child
process loads the input into memory, then times :func:`stf_pipeline.fuse` of the input's task
(``--repeat`` runs: the first includes JAX compilation, the best of the others is the steady
time; the CPU seconds of the last run are reported too, a measure that other processes on a
shared machine disturb less) and reports its peak resident memory (``ru_maxrss`` of the child) and, on a GPU, the
device's peak memory. Inputs:

* the real sets of ``--sets`` (``stf.open_catalog``; their catalog task), and
* a synthetic ``--size``² × ``--bands`` scene (:func:`stf_pipeline.synthetic_scene` at 30 m, so
  STARFM's default 750 m search distance is the usual 51×51 window; target: the middle date,
  pairs: the first and last dates).

Learned methods are first trained with the ``"tiny"`` configuration on the input's pair dates
(training time reported apart); where that is impossible they are reported as skipped. On the
CPU the scene is fused through Dask in ``--chunk``-pixel chunks (threads use every core); with
``--gpu`` it is fused in one block on the GPU. ``--backends numba jax`` times each method once
per listed backend it declares (``MethodSpec.backends``), side by side. Prints a
table; writes JSON (``--json``) with the machine description and the load average of each run,
rewritten after every run so that a benchmark cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import time
from typing import Any

from benchmarks._common import child_command, describe_machine, write_result

DEFAULT_SETS = ("zhu_estarfm", "zhu_fsdaf_lgc", "imagefusion_kranj")


def _load(source: str, size: int, bands: int) -> tuple[Any, Any, list[Any]]:
    import numpy as np

    import stf_pipeline as stf

    if source == "synthetic":
        from stf_pipeline.synthetic import BANDS

        cube = stf.synthetic_scene(
            size, size, n_times=3, seed=0, pixel_size=30.0, fine_times=[0, 2], bands=BANDS[:bands]
        )
        cube = cube.load()
        times = cube.time.values
        return cube, times[1], [times[0], times[2]]
    cube, task = stf.open_catalog(source, chunks=None)
    return cube, task.target, list(np.atleast_1d(task.pairs))


def _label(job: dict[str, Any]) -> str:
    if job["source"] != "synthetic":
        return job["source"]
    return f"synthetic {job['size']}x{job['size']}x{job['bands']}"


def _job_id(job: dict[str, Any]) -> dict[str, Any]:
    return {"method": job["method"], "backend": job.get("backend") or "default", "input": _label(job)}


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement (in a fresh process) and return its record."""
    import jax
    import numpy as np

    import stf_pipeline as stf
    from stf_pipeline.methods import get_method

    spec = get_method(job["method"])
    cube, target, pairs = _load(job["source"], job["size"], job["bands"])
    pairs = pairs[: spec.n_pairs[1]]
    record: dict[str, Any] = {
        **_job_id(job),
        "shape": [int(cube.sizes["band"]), int(cube.sizes["y"]), int(cube.sizes["x"])],
        "pairs": len(pairs),
        "device": jax.default_backend(),
    }
    if len(pairs) < spec.n_pairs[0]:
        return {**record, "skipped": f"needs {spec.n_pairs[0]} pairs, the input has {len(pairs)}"}
    kwargs: dict[str, Any] = {"backend": job["backend"]} if job.get("backend") else {}
    if spec.learned:
        start = time.perf_counter()
        try:
            kwargs["model"] = stf.train(cube, method=job["method"], train_times=pairs, config="tiny")
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            return {**record, "skipped": f"tiny training impossible: {err}"}
        record["train_s"] = time.perf_counter() - start
    chunks = None if job["gpu"] or not job["chunk"] else (job["chunk"], job["chunk"])
    seconds, cpu_seconds = [], []
    for _ in range(job["repeat"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        pred = stf.fuse(cube, target, method=job["method"], pairs=pairs, chunks=chunks, **kwargs)
        values = np.asarray(pred.values)
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    record["first_s"] = seconds[0]
    record["steady_s"] = min(seconds[1:]) if len(seconds) > 1 else None
    # CPU seconds of the process (all threads): robust to other processes on a shared machine
    record["cpu_s"] = cpu_seconds[-1]
    record["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["loadavg_1min"] = os.getloadavg()[0]
    stats = jax.devices()[0].memory_stats() if job["gpu"] else None
    if stats and "peak_bytes_in_use" in stats:
        record["gpu_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    if "fine_truth" in cube:
        truth = cube["fine_truth"].sel(time=target)
        scores = stf.evaluate(pred, truth)
        record["rmse"] = float(scores["rmse"].mean())
        record["ssim"] = float(scores["ssim"].mean())
    record["valid_fraction"] = float(np.isfinite(values).mean())
    return record


def _run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    command, env = child_command("methods", "--child", json.dumps(job))
    if not job["gpu"]:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {**_job_id(job), "skipped": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**_job_id(job), "skipped": f"failed: {tail[0]}"}


def _num(record: dict[str, Any], key: str, fmt: str) -> str:
    value = record.get(key)
    return format(value, fmt) if value is not None else "-"


def _table(records: list[dict[str, Any]]) -> str:
    head = (
        f"{'method':9s} {'backend':8s} {'input':28s} {'dev':4s} {'first s':>8s} {'steady s':>8s} {'CPU s':>7s} "
        f"{'RSS MiB':>8s} {'GPU MiB':>8s} {'RMSE':>8s} {'SSIM':>6s}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['method']:9s} {r.get('backend', '-'):8s} {r['input']:28s} skipped: {r['skipped']}")
            continue
        numbers = [
            _num(r, key, fmt)
            for key, fmt in (("first_s", "8.2f"), ("steady_s", "8.2f"), ("cpu_s", "7.1f"), ("peak_rss_mib", "8.0f"),
                             ("gpu_peak_mib", "8.0f"), ("rmse", "8.5f"), ("ssim", "6.3f"))
        ]
        lines.append(f"{r['method']:9s} {r['backend']:8s} {r['input']:28s} {r['device']:4s} " + " ".join(numbers))
    return "\n".join(lines)


def _backends(method: str, wanted: list[str] | None) -> list[str | None]:
    """The ``backend=`` values to time ``method`` with: those of ``wanted`` it declares
    (``[None]``: its ``auto`` choice)."""
    from stf_pipeline.methods import get_method

    declared = get_method(method).backends
    chosen: list[str | None] = [b for b in wanted or [] if b in declared]
    return chosen or [None]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog="stf bench methods", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", help="methods to time (default: all available)")
    parser.add_argument("--sets", nargs="*", default=list(DEFAULT_SETS), help="real catalog sets")
    parser.add_argument("--size", type=int, default=2000, help="synthetic scene side (0: none)")
    parser.add_argument("--bands", type=int, default=6, help="synthetic scene bands")
    parser.add_argument("--chunk", type=int, default=512, help="CPU chunk side for Dask (0: one block)")
    parser.add_argument("--repeat", type=int, default=2, help="fuse calls per real set (first compiles)")
    parser.add_argument("--synthetic-repeat", type=int, default=1, help="fuse calls on the synthetic scene")
    parser.add_argument("--gpu", action="store_true", help="run JAX kernels on the GPU, one block per scene")
    parser.add_argument(
        "--backends", nargs="+", help="backend= values to time side by side for methods that take one (e.g. numba jax)"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--json", default="bench_methods.json", help="output JSON path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return 0

    from stf_pipeline.methods import available_methods

    methods = args.methods or available_methods()
    info = describe_machine()
    print(f"machine: {info}", flush=True)
    jobs = [(source, args.repeat) for source in args.sets]
    if args.size:
        jobs.append(("synthetic", args.synthetic_repeat))
    records = []
    for source, repeat in jobs:
        for method in methods:
            for backend in _backends(method, args.backends):
                job = {
                    "method": method, "source": source, "size": args.size, "bands": args.bands,
                    "chunk": args.chunk, "repeat": max(1, repeat), "gpu": args.gpu, "backend": backend,
                }
                record = _run_child(job, args.timeout)
                records.append(record)
                print(_table([record]).splitlines()[-1], flush=True)
                write_result(args.json, info, args, records, quiet=True)
    print(_table(records))
    write_result(args.json, info, args, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
