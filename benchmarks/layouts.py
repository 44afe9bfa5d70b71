"""``stf bench layouts``: the Pallas layouts of STARFM's and ESTARFM's window sums, side by side.

A Pallas program of these kernels computes ``rows`` output rows of ``width`` pixels for a group of
``bands`` bands with ``warps`` warps (:class:`stf_pipeline.kernels.pallas.Layout`): more rows share
each loaded neighbour row, fewer bands keep fewer accumulators in registers. This benchmark runs
each method's Pallas block kernel (preparation, window sums and prediction on the device, the
block's transfers included) on one synthetic ``--size``² × 6 scene at 30 m (STARFM's default 51 × 51
window, ESTARFM's 51 × 51) with each layout of ``--layouts`` and reports the first call (it
compiles), the best of ``--repeats`` further calls, and the largest difference from the first
layout's prediction (0: every layout adds the same terms in the same order). The kernels' default
layouts were chosen with it. Needs a GPU (Pallas runs interpreted, very slowly, on a CPU).

Layouts are written ``ROWSxWIDTH[/BANDS][@WARPS]`` (``8x256/1@4``: 8 rows of 256 pixels, one band
a program, 4 warps; no ``/BANDS``: all bands). Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from benchmarks._common import describe_machine, write_result

DEFAULT_LAYOUTS = {
    "starfm": ["1x128", "2x128", "4x128/1", "8x128/1", "8x256/1", "8x128/2", "4x128/3"],
    "estarfm": ["1x128", "2x128", "2x128/2", "2x128/3", "4x128/1"],
}


def parse_layout(text: str) -> Any:
    """``ROWSxWIDTH[/BANDS][@WARPS]`` as a :class:`~stf_pipeline.kernels.pallas.Layout`."""
    from stf_pipeline.kernels.pallas import Layout

    match = re.fullmatch(r"(\d+)x(\d+)(?:/(\d+))?(?:@(\d+))?", text)
    if match is None:
        raise ValueError(f"layout {text!r} is not ROWSxWIDTH[/BANDS][@WARPS], e.g. 8x256/1@4.")
    rows, width, bands, warps = match.groups()
    return Layout(rows=int(rows), width=int(width), bands=int(bands or 0), warps=int(warps or 4))


def _block(method: str, size: int) -> tuple[Any, Any, Any, Any, Any]:
    """The method's kernel, its prepared parameters and the scene's pair and target images."""
    import stf_pipeline as stf
    from stf_pipeline.fusion import method_context

    cube = stf.synthetic_scene(size, size, n_times=3, seed=0, pixel_size=30.0, fine_times=[0, 2]).load()
    spec = stf.get_method(method)
    params = spec.make_params()
    if spec.prepare is not None:
        params = spec.prepare(params, method_context(cube))
    fine = cube["fine"].values[[0, 2]]
    coarse = cube["coarse"].values[[0, 2]]
    target = cube["coarse"].values[1]
    if spec.statistics is not None:
        params = spec.statistics(fine, coarse, target, params)
    return spec.kernel_for("pallas"), params, fine, coarse, target


def measure(method: str, layouts: list[str], size: int, repeats: int) -> list[dict[str, Any]]:
    """One record per layout: first and steady seconds and the difference from the first layout."""
    import numpy as np

    kernel, params, fine, coarse, target = _block(method, size)
    records, reference = [], None
    for text in layouts:
        layout = parse_layout(text)
        start = time.perf_counter()
        out = kernel(fine, coarse, target, params=params, layout=layout)
        first = time.perf_counter() - start
        steady = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(fine, coarse, target, params=params, layout=layout)
            steady = min(steady, time.perf_counter() - start)
        reference = out if reference is None else reference
        record = {
            "method": method, "layout": text, "rows": layout.rows, "width": layout.width, "bands": layout.bands,
            "warps": layout.warps, "size": size, "first_s": first, "steady_s": steady,
            "max_abs_diff": float(np.nanmax(np.abs(out - reference))),
            "same_nan": bool((np.isnan(out) == np.isnan(reference)).all()),
        }
        print(
            f"{method:8s} {text:10s} first {first:7.3f} s  steady {steady:7.4f} s  "
            f"max |diff| {record['max_abs_diff']:.2g}", flush=True,
        )
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stf bench layouts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["starfm", "estarfm"], choices=sorted(DEFAULT_LAYOUTS))
    parser.add_argument("--layouts", nargs="+", help="layouts to time (default: a sweep per method)")
    parser.add_argument("--size", type=int, default=2000, help="synthetic scene side")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--json", help="output JSON path")
    args = parser.parse_args(argv)
    info = describe_machine()
    records: list[dict[str, Any]] = []
    for method in args.methods:
        records += measure(method, args.layouts or DEFAULT_LAYOUTS[method], args.size, args.repeats)
        if args.json:
            write_result(args.json, info, args, records, quiet=True)
    if args.json:
        write_result(args.json, info, args, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
