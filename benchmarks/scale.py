"""``stf bench scale``: how fusion time and memory grow with the scene.

For each scene side (1000, 2000, 4000, 8000; 16000 with ``--large``) and method, a fresh child
process fuses one target date of a 6-band synthetic scene through :func:`stf_pipeline.fuse`
(Dask, default threaded scheduler) and streams the prediction into a Zarr store on disk; the
parent samples the resident memory of the child's whole process tree every 20 ms. Reported:
wall time, pixels/s, time per pixel relative to the 2000² scene, and peak RSS.

The input is :func:`stf_pipeline.synthetic_scene` computed once on a ``--tile``-sized tile and
repeated lazily (``dask.array.tile``) to the scene size, so scene generation does not hide the
engine's own scaling; the values are realistic reflectances, and every chunk is real work.

``--overhead`` (default on) compares, on an in-memory 2000² cube, the method's kernel called once
on the whole arrays with ``stf.fuse`` through Dask (chunks of ``--chunk``): the threaded
scheduler (what users get) and the synchronous one (the engine's pure overhead: overlap,
halo trim, task bookkeeping, no parallel speed-up).

``--series`` instead measures :func:`stf_pipeline.fuse_series` the way a user runs it at scale:
the tiled scene (``--bands`` bands, ``--dates`` dates, fine on the first and last) is first
written to a Zarr cube store (not timed, in its own process), then a fresh process opens it with
:func:`stf_pipeline.open_cube` and fuses every coarse-only date into a store with each of
``--methods`` (one fresh process per method), with ``--chunk`` chunks on the threaded scheduler
with ``--workers`` workers. Sizes are ``HEIGHTxWIDTH`` or one
side (square). Reported: wall time and the peak RSS of the fusing process, whose ratio between
sizes shows whether memory follows the scene or the chunk, and the end-to-end throughput (fused
pixels per second) against the kernel-only throughput of the same process: the method's kernel on
one in-memory chunk with its halo, chunk pixels per second, so the ratio is what reading,
scheduling and writing leave of the compute.

``--gpu-series 1 2`` instead times :func:`stf_pipeline.fuse_series` (3 fused dates of a 5-date
``--gpu-size`` scene, after a compiling warm-up on a small scene) on a dask-cuda cluster with
1 and then 2 GPU workers (one per GPU, 2 threads each) and reports the speed-up.

Prints a table and writes JSON (``--json``) with the machine description and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import best_wall_time, child_command, describe_machine

SIZES = (1000, 2000, 4000, 8000)
LARGE = 16000
N_BANDS = 6


def tiled_cube(
    size: int | tuple[int, int],
    *,
    tile: int = 500,
    seed: int = 0,
    n_times: int = 3,
    computed: bool = True,
    n_bands: int = N_BANDS,
) -> Any:
    """A lazy ``size x size`` (or ``(height, width)``) cube made of one synthetic tile repeated.

    Fine images on the first and last date; the dates between are coarse-only (targets). With
    ``computed`` the tile is computed here and held in memory (the threaded scheduler then reads
    it for free); otherwise it stays lazy, so a distributed cluster generates it on the workers
    (once per worker) instead of receiving it inside the graph. ``n_bands`` keeps the first
    bands of the synthetic scene's six.
    """
    import dask
    import dask.array as da
    import numpy as np

    import stf_pipeline as stf

    height, width = (size, size) if isinstance(size, int) else size
    if height % tile or width % tile:
        raise ValueError(f"scene size {height}x{width} must be a multiple of the tile {tile}; pick --tile accordingly.")
    src = stf.synthetic_scene(tile, tile, n_times=n_times, seed=seed, fine_times=[0, n_times - 1], chunks=tile)
    src = src.isel(band=slice(0, n_bands))
    images = (src["fine"].data, src["coarse"].data)
    if computed:
        values = dask.compute(*images, scheduler="sync")
        images = tuple(da.from_array(a, chunks=(1, n_bands, tile, tile)) for a in values)
    reps = (1, 1, height // tile, width // tile)
    fine, coarse = (da.tile(a, reps) for a in images)
    step = float(src.x.values[1] - src.x.values[0])
    cube = stf.make_cube(
        fine, coarse, time=src.time.values, band=list(src.band.values),
        y=src.y.values[0] - step * np.arange(height), x=src.x.values[0] + step * np.arange(width),
        crs=src.rio.crs, coarse_factor=src.attrs["coarse_factor"],
    )
    valid = {name: ("time", src[f"{name}_valid"].values) for name in ("fine", "coarse")}
    return cube.assign_coords({f"{k}_valid": v for k, v in valid.items()})


# --------------------------------------------------------------------------------------------
# child processes (one measurement each, so peak memory is the case's own)


def _child_case(size: int, method: str, tile: int, workdir: Path) -> dict[str, Any]:
    import stf_pipeline as stf

    cube = tiled_cube(size, tile=tile)
    target = cube.time.values[1]
    start = time.perf_counter()
    pred = stf.fuse(cube, target, method=method)
    pred.data.to_zarr(str(workdir / "pred.zarr"), overwrite=True)
    wall = time.perf_counter() - start
    return {"size": size, "method": method, "wall_s": wall, "pixels": size * size}


def _parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width or height)


def _child_prepare(size: str, tile: int, bands: int, dates: int, chunk: int, store: Path) -> dict[str, Any]:
    import dask

    import stf_pipeline as stf

    cube = tiled_cube(_parse_size(size), tile=tile, n_times=dates, n_bands=bands)
    with dask.config.set(scheduler="threads"):
        stf.write_cube(cube, store, chunks={"y": chunk, "x": chunk}, overwrite=True)
    return {"store": str(store)}


def _child_series(
    store: Path, method: str, chunk: int, workers: int, out: Path, progress: bool = False
) -> dict[str, Any]:
    import sys

    import dask

    import stf_pipeline as stf

    cube = stf.open_cube(store)
    start = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=workers):
        fused = stf.fuse_series(cube, method=method, out=out, chunks=(chunk, chunk), progress=progress)
    wall = time.perf_counter() - start
    print(f"{method}: fuse_series took {wall:.1f} s; timing the kernel on one chunk", file=sys.stderr, flush=True)
    height, width = cube.sizes["y"], cube.sizes["x"]
    fused_dates = int((fused["source"].values == "fused").sum())
    kernel_s, halo = _kernel_block_seconds(cube, method, chunk)
    end_to_end = fused_dates * height * width / wall / 1e6
    kernel_only = chunk * chunk / kernel_s / 1e6
    return {
        "method": method, "height": height, "width": width, "bands": cube.sizes["band"], "dates": cube.sizes["time"],
        "fused_dates": fused_dates, "chunk": chunk, "workers": workers,
        "wall_s": wall, "pixels": height * width, "halo": halo, "kernel_block_s": kernel_s,
        "end_to_end_mpx_s": end_to_end, "kernel_only_mpx_s": kernel_only,
        "end_to_end_vs_kernel": end_to_end / kernel_only,
    }


def _kernel_block_seconds(cube: Any, method: str, chunk: int, repeats: int = 3) -> tuple[float, int]:
    """Best seconds of the method's kernel on one in-memory ``chunk``-sized block with its halo
    (after a warm-up), and the halo: what one task of the series computes, without the reads,
    the writes and the scheduling. ``chunk**2 / seconds`` is the kernel-only throughput."""
    from stf_pipeline.fusion import prepare_fusion

    times = cube.time.values
    call = prepare_fusion(cube, times[len(times) // 2], method=method, pairs=[times[0], times[-1]])
    side = chunk + 2 * call.halo
    window = cube.isel(y=slice(0, side), x=slice(0, side)).load()
    call = call.with_scene_statistics(window)
    call.run(window)
    return best_wall_time(lambda: call.run(window), repeats), call.halo


def _series_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes_text:
        with tempfile.TemporaryDirectory(prefix="stf-bench-", dir=args.workdir) as tmp:
            store = Path(tmp) / "input.zarr"
            start = time.perf_counter()
            _run_child(["--child", "prepare", size, str(args.tile), str(args.bands), str(args.dates),
                        str(args.chunk), str(store)])
            print(f"wrote the {size} input store in {time.perf_counter() - start:.1f} s", flush=True)
            for method in args.methods:
                result, peak = _run_child(
                    ["--child", "series", str(store), method, str(args.chunk), str(args.workers),
                     str(Path(tmp) / f"fused_{method}.zarr"), str(int(args.progress))]
                )
                result["peak_rss_bytes"] = peak
                rows.append(result)
                print(
                    f"{method} series {result['height']}x{result['width']} ({result['bands']} bands, "
                    f"{result['fused_dates']} fused dates): {result['wall_s']:.2f} s, peak RSS {peak / 2**30:.2f} GiB, "
                    f"{result['end_to_end_mpx_s']:.3g} Mpx/s end to end against {result['kernel_only_mpx_s']:.3g} "
                    f"Mpx/s of the kernel alone ({result['end_to_end_vs_kernel']:.0%})",
                    flush=True,
                )
    for method in args.methods:
        own = [r for r in rows if r["method"] == method]
        ref = next((r for r in own if (r["height"], r["width"]) == (2000, 2000)), None)
        for r in own:  # only beside a measured 2000² peak (the memory target's reference)
            r["peak_vs_2000"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"] if ref else None
    return rows


def _child_overhead(size: int, method: str, chunk: int, repeats: int) -> dict[str, Any]:
    import numpy as np

    import stf_pipeline as stf
    from stf_pipeline.fusion import method_context

    cube = tiled_cube(size, tile=chunk if size % chunk == 0 else size).compute()
    target = cube.time.values[1]
    spec = stf.get_method(method)
    params = spec.make_params()
    if spec.prepare is not None:
        params = spec.prepare(params, method_context(cube))
    pairs = list(cube.time.values[[0, 2]])
    fine = cube["fine"].sel(time=pairs).values
    coarse = cube["coarse"].sel(time=pairs).values
    coarse_target = cube["coarse"].sel(time=target).values
    if spec.statistics is not None:
        params = spec.statistics(fine, coarse, coarse_target, params)

    def kernel() -> Any:
        return spec.kernel(fine, coarse, coarse_target, params=params)

    def engine(scheduler: str) -> Any:
        return stf.fuse(cube, target, method=method, chunks=(chunk, chunk)).data.compute(scheduler=scheduler)

    reference = kernel()
    np.testing.assert_array_equal(engine("threads"), reference)
    times: dict[str, list[float]] = {"kernel": [], "threads": [], "sync": []}
    for _ in range(repeats):  # interleaved, so load changes hit all three alike
        for name, fn in (("kernel", kernel), ("threads", lambda: engine("threads")), ("sync", lambda: engine("sync"))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    return {
        "size": size,
        "method": method,
        "chunk": chunk,
        "kernel_s": best["kernel"],
        "engine_threads_s": best["threads"],
        "engine_sync_s": best["sync"],
        "overhead_threads": best["threads"] / best["kernel"],
        "overhead_sync": best["sync"] / best["kernel"],
        "all_s": times,
    }


def _child_gpu_series(workers: list[int], size: int, method: str, chunk: int, workdir: Path) -> dict[str, Any]:
    import stf_pipeline as stf
    from stf_pipeline.cluster import ClusterConfig, start_cluster

    cube = tiled_cube(size, tile=chunk, n_times=5, computed=False)
    warm = tiled_cube(3 * chunk, tile=chunk, n_times=3, computed=False)  # every block shape of the big scene
    rows = []
    for n in workers:
        with start_cluster(ClusterConfig(gpu=True, n_workers=n, threads_per_worker=2)) as client:
            # every worker compiles the kernel for the block shapes once
            stf.fuse_series(warm, method=method, out=workdir / f"warm{n}.zarr", chunks=(chunk, chunk), progress=False)
            start = time.perf_counter()
            stf.fuse_series(cube, method=method, out=workdir / f"series{n}.zarr", chunks=(chunk, chunk), progress=False)
            wall = time.perf_counter() - start
            devices = client.run(_worker_jax_devices)
        rows.append({"workers": n, "wall_s": wall, "pixels": size * size, "worker_devices": devices})
    base = rows[0]["wall_s"]
    for row in rows:
        row["speedup"] = base / row["wall_s"]
    return {"size": size, "method": method, "chunk": chunk, "rows": rows}


def _worker_jax_devices() -> str:
    import jax

    return f"{os.environ.get('CUDA_VISIBLE_DEVICES')} -> {[str(d) for d in jax.devices()]}"


def _run_child(argv: list[str]) -> tuple[dict[str, Any], float]:
    """Run this module with ``argv`` in a fresh process; return its JSON result and peak RSS (bytes)."""
    import psutil

    command, env = child_command("scale", *argv)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            peak = max(peak, total)
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {argv} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, float(peak)


# --------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<8} {'scene':>11} {'wall s':>8} {'Mpix/s':>8} {'t/pix vs 2000²':>15} {'peak RSS GiB':>13}"]
    for r in rows:
        rel = f"{r['time_per_pixel_vs_2000']:.2f}x" if r.get("time_per_pixel_vs_2000") else "-"
        lines.append(
            f"{r['method']:<8} {r['size']:>5}x{r['size']:<5} {r['wall_s']:8.2f} {r['pixels_per_s'] / 1e6:8.2f} "
            f"{rel:>15} {r['peak_rss_bytes'] / 2**30:13.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``stf bench scale``."""
    parser = argparse.ArgumentParser(prog="stf bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["delta"], help="non-learned methods to time")
    parser.add_argument(
        "--sizes", nargs="+", default=[str(s) for s in SIZES], help="scene sides, or HEIGHTxWIDTH (--series)"
    )
    parser.add_argument("--large", action="store_true", help=f"also {LARGE}x{LARGE}")
    parser.add_argument("--tile", type=int, default=250, help="synthetic tile side; chunk size of the scenes")
    parser.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the engine-overhead run")
    parser.add_argument("--overhead-size", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the overhead timings (best kept)")
    parser.add_argument("--gpu-series", nargs="+", type=int, metavar="N", help="time fuse_series on N GPU workers")
    parser.add_argument("--gpu-size", type=int, default=4000, help="scene side of the GPU series")
    parser.add_argument("--series", action="store_true", help="measure fuse_series from a Zarr cube store")
    parser.add_argument("--bands", type=int, default=N_BANDS, help="bands of the --series scenes")
    parser.add_argument("--dates", type=int, default=3, help="dates of the --series scenes (fine on first and last)")
    parser.add_argument("--chunk", type=int, default=512, help="store and computation chunk of --series")
    parser.add_argument("--workers", type=int, default=2, help="threads of the --series run")
    parser.add_argument("--workdir", type=Path, default=None, help="where --series writes its temporary stores")
    parser.add_argument(
        "--progress", action="store_true", help="--series: fuse_series logs its progress (to stderr)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_scale.json"), help="output JSON path")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes_text = list(args.sizes)
    if not args.series:
        args.sizes = [int(s) for s in args.sizes]

    if args.child:
        kind, *rest = args.child
        with tempfile.TemporaryDirectory(prefix="stf-bench-") as tmp:
            if kind == "prepare":
                result = _child_prepare(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[4]), Path(rest[5]))
            elif kind == "series":
                result = _child_series(
                    Path(rest[0]), rest[1], int(rest[2]), int(rest[3]), Path(rest[4]), bool(int(rest[5]))
                )
            elif kind == "case":
                result = _child_case(int(rest[0]), rest[1], int(rest[2]), Path(tmp))
            elif kind == "overhead":
                result = _child_overhead(int(rest[0]), rest[1], int(rest[2]), int(rest[3]))
            else:
                workers = [int(n) for n in rest[3:]]
                result = _child_gpu_series(workers, int(rest[0]), rest[1], int(rest[2]), Path(tmp))
        print(json.dumps(result))
        return 0

    import stf_pipeline as stf

    learned = [m for m in args.methods if stf.get_method(m).learned]
    if learned:
        parser.error(f"learned methods {learned} need a trained model; time them with stf bench {learned[0]}.")
    report: dict[str, Any] = {
        "machine": describe_machine(with_jax=False), "cases": [], "overhead": [], "gpu_series": [], "series": []
    }
    if args.series:
        report["series"] = _series_report(args)
        print()
        for r in report["series"]:
            print(
                f"{r['method']:<8} {r['height']:>6}x{r['width']:<6} {r['wall_s']:8.2f} s "
                f"{r['peak_rss_bytes'] / 2**30:8.2f} GiB "
                + (f"({r['peak_vs_2000']:.2f}x the 2000² peak)" if r["peak_vs_2000"] is not None else "(no 2000² run)")
                + f", {r['end_to_end_vs_kernel']:.0%} of kernel-only throughput"
            )
    elif args.gpu_series:
        for method in args.methods:
            result, peak = _run_child(
                ["--child", "gpu", str(args.gpu_size), method, str(args.tile), *map(str, args.gpu_series)]
            )
            result["peak_rss_bytes"] = peak
            report["gpu_series"].append(result)
            for row in result["rows"]:
                print(
                    f"{method} {args.gpu_size}² series on {row['workers']} GPU worker(s): {row['wall_s']:.2f} s, "
                    f"speed-up {row['speedup']:.2f}x  ({row['worker_devices']})"
                )
    else:
        sizes = sorted(set(args.sizes) | ({LARGE} if args.large else set()))
        for method in args.methods:
            rows = []
            for size in sizes:
                result, peak = _run_child(["--child", "case", str(size), method, str(args.tile)])
                result["peak_rss_bytes"] = peak
                result["pixels_per_s"] = result["pixels"] / result["wall_s"]
                rows.append(result)
                print(f"{method} {size}²: {result['wall_s']:.2f} s, peak RSS {peak / 2**30:.2f} GiB", flush=True)
            ref = next((r for r in rows if r["size"] == 2000), None)
            for r in rows:
                if ref is not None:
                    r["time_per_pixel_vs_2000"] = ref["pixels_per_s"] / r["pixels_per_s"]
            report["cases"].extend(rows)
            if args.overhead:
                result, peak = _run_child(
                    ["--child", "overhead", str(args.overhead_size), method, str(args.tile), str(args.repeats)]
                )
                result["peak_rss_bytes"] = peak
                report["overhead"].append(result)
        print()
        print(_table(report["cases"]))
        for r in report["overhead"]:
            print(
                f"engine overhead, {r['method']} {r['size']}² (chunks {r['chunk']}): kernel on the whole array "
                f"{r['kernel_s']:.2f} s; fuse via Dask threads {r['engine_threads_s']:.2f} s "
                f"({r['overhead_threads']:.2f}x), synchronous {r['engine_sync_s']:.2f} s ({r['overhead_sync']:.2f}x)"
            )
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    print(f"load average at start {report['machine']['loadavg_start']}, end {report['machine']['loadavg_end']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
