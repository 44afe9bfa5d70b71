"""``stf bench targets``: issue 18's speed targets, measured in one run and judged, into one JSON.

Each target is read from the JSON of the benchmark that measures it, run here as a child process
with the issue's sizes (``stf bench methods``, ``biastf``, ``compile``, ``scale --series``, ``startup``); a
child that fails or runs out of time leaves its targets "not measured", the others still run.
Ratios are of numbers measured in this run on this machine (BiaSTF's warm Zarr run against its
kernel in the same child, its first Zarr run in a new process against a warm one of the same
model, ``stf bench compile``; the series against its kernel alone in the same process).

``--gpu`` runs the GPU targets (one GPU), otherwise the CPU ones (2000² × 6 ESTARFM and FSDAF, the
one-shot process); ``--only`` picks targets by name (``--list`` shows them). ``--reuse`` judges
from the children's JSON of an earlier run instead of running them again, so runs that a
machine's time limit splits (``--only`` in turn) are judged together. Prints a table and
writes JSON (``--json``): the machine, the arguments and one record per target (measured value,
the limit, measured / limit, met), which ``python docs/gen_benchmarks.py add`` makes the docs'
table of; each child's own JSON lies beside it (``bench_targets.methods.json``...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import child_command, describe_machine, write_result

#: what a target reads: the results of each child run, by run name
Results = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Run:
    """A child benchmark: ``stf bench NAME ARGS... --json FILE``, cut off after ``timeout`` seconds."""

    name: str
    benchmark: str
    args: tuple[str, ...]
    timeout: float


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the issue's targets: ``measure(results)`` gives the measured value (``None``: the
    run lacks it) and a note; met when it is at most (``at_most``) or at least ``limit``."""

    name: str
    work: str
    run: str
    limit: float
    unit: str
    at_most: bool
    measure: Callable[[Results], tuple[float | None, str]]

    @property
    def limit_text(self) -> str:
        """``≤ 0.2 s``, ``≥ 0.9``."""
        return f"{'≤' if self.at_most else '≥'} {self.limit:g}{self.unit}"

    def judge(self, results: Results) -> dict[str, Any]:
        """The record of this target for ``results`` (a run missing from it: not measured)."""
        record: dict[str, Any] = {"target": self.name, "work": self.work, "limit": self.limit_text}
        if self.run not in results:
            return {**record, "measured": None, "of_limit": None, "met": None, "note": f"run {self.run} gave no result"}
        record["measured_on"] = machine_label(results[self.run].get("machine", {}))
        try:
            value, note = self.measure(results)
        except (KeyError, IndexError, StopIteration, TypeError, ZeroDivisionError) as err:
            value, note = None, f"not in the run's results ({type(err).__name__}: {err})"
        if value is None:
            return {**record, "measured": None, "of_limit": None, "met": None, "note": note}
        met = value <= self.limit if self.at_most else value >= self.limit
        return {**record, "measured": value, "of_limit": value / self.limit, "met": met, "note": note}


def machine_label(machine: Mapping[str, Any]) -> str:
    """A child's machine in a few words: its first GPU, else its CPU and cores."""
    if machine.get("gpus"):
        return str(machine["gpus"][0])
    return f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cores', '?')} cores"


def _record(records: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any]:
    """The first record whose fields equal ``match``."""
    return next(r for r in records if all(r.get(k) == v for k, v in match.items()))


def _synthetic(results: Results, method: str) -> Mapping[str, Any]:
    """``stf bench methods``' record of ``method`` on the synthetic scene (its ``input``: ``synthetic HxWxB``)."""
    return next(
        r for r in results["methods"]["results"] if r["method"] == method and r["input"].startswith("synthetic")
    )


def _steady(method: str) -> Callable[[Results], tuple[float | None, str]]:
    def measure(results: Results) -> tuple[float | None, str]:
        record = _synthetic(results, method)
        if record.get("skipped"):
            return None, str(record["skipped"])
        return record["steady_s"], f"first call {record['first_s']:.2f} s; RMSE {record.get('rmse', float('nan')):.5f}"

    return measure


def _host_cpu(method: str) -> Callable[[Results], tuple[float | None, str]]:
    def measure(results: Results) -> tuple[float | None, str]:
        record = _synthetic(results, method)
        return record["cpu_s"], "CPU seconds of the process (all threads) in its last call"

    return measure


def _biastf_defaults() -> tuple[int, str]:
    import stf_pipeline as stf

    params = stf.get_method("biastf").params_type()
    return params.self_ensemble, params.dtype


def _over_floor(layout: str, dtype: str) -> Callable[[Results], tuple[float | None, str]]:
    def measure(results: Results) -> tuple[float | None, str]:
        views, _ = _biastf_defaults()
        row = _record(results["biastf"]["inference"], layout=layout, dtype=dtype, self_ensemble=views)
        note = f"{row['compute_s']:.4f} s against a bare forward floor of {row['floor_s']:.4f} s"
        return row["compute_over_floor"], note

    return measure


def _zarr_first_over_warm(results: Results) -> tuple[float | None, str]:
    row = _record(results["compile"]["results"], method="biastf")
    return row["disk_over_warm"], (
        f"a new process, disk cache filled: {row['disk_s']:.2f} s against warm {row['warm_s']:.2f} s; "
        f"JAX started first {row['ready_over_warm']:.2f} x; empty cache {row['first_over_warm']:.2f} x"
    )


def _zarr_warm_over_kernel(results: Results) -> tuple[float | None, str]:
    views, dtype = _biastf_defaults()
    zarr = results["biastf"]["zarr"]
    row = _record(results["biastf"]["inference"], layout=zarr["layout"], dtype=dtype, self_ensemble=views)
    warm = zarr[f"{dtype}_best_s"]
    note = f"{dtype}: warm {warm:.3f} s, kernel from NumPy {row['kernel_s']:.3f} s"
    if f"{dtype}_chunks_best_s" in zarr:  # the side-by-side run with the cube's chunks as blocks
        note += f"; the cube's chunks as blocks {zarr[f'{dtype}_chunks_best_s']:.3f} s"
    return warm / row["kernel_s"], note


def _stage_b_over_g(dtype: str) -> Callable[[Results], tuple[float | None, str]]:
    def measure(results: Results) -> tuple[float | None, str]:
        rows = results["biastf"]["training"]
        g = _record(rows, stage="G", layout="multiband", dtype=dtype)["patches_per_s"]
        b = _record(rows, stage="B, frozen G", layout="multiband", dtype=dtype)["patches_per_s"]
        return b / g, f"multiband {dtype}: stage B {b:.0f}, stage G {g:.0f} patches/s"

    return measure


def _series(results: Results) -> tuple[float | None, str]:
    row = results["series"]["series"][0]
    return row["end_to_end_vs_kernel"], (
        f"{row['end_to_end_mpx_s']:.1f} against {row['kernel_only_mpx_s']:.1f} Mpx/s, {row['wall_s']:.1f} s, "
        f"peak RSS {row['peak_rss_bytes'] / 2**30:.1f} GiB"
    )


def _startup(step: str) -> Callable[[Results], tuple[float | None, str]]:
    def measure(results: Results) -> tuple[float | None, str]:
        row = _record(results["startup"]["results"], step=step)
        return row["wall_s"], f"best of {row['runs']}, {row['cpu_s']:.2f} CPU-s"

    return measure


def runs(gpu: bool, cores: int) -> dict[str, Run]:
    """The child runs of the GPU or the CPU targets (``cores``: threads of the series)."""
    if gpu:
        return {
            "methods": Run("methods", "methods", ("--methods", "starfm", "estarfm", "fsdaf", "--sets", "--size", "2000",
                                                  "--gpu", "--synthetic-repeat", "4"), 600),
            "biastf": Run("biastf", "biastf", ("--gpu", "--layouts", "per-band,multiband", "--repeats", "3",
                                               "--self-ensembles", str(_biastf_defaults()[0])), 900),
            "compile": Run("compile", "compile", ("--methods", "biastf:jax", "--size", "2000", "--chunk", "1024",
                                                  "--skip-unpadded"), 600),
            "series": Run("series", "scale", ("--series", "--sizes", "10000", "--dates", "12", "--chunk", "2000",
                                              "--methods", "starfm", "--workers", str(cores)), 900),
        }
    return {
        "methods": Run("methods", "methods", ("--methods", "estarfm", "fsdaf", "--sets", "--size", "2000",
                                              "--backends", "numba", "--synthetic-repeat", "2"), 900),
        "startup": Run("startup", "startup", ("--repeat", "3"), 600),
    }


GPU_TARGETS: tuple[Target, ...] = (
    Target("starfm", "STARFM 2000² × 6, steady", "methods", 0.2, " s", True, _steady("starfm")),
    Target("estarfm", "ESTARFM 2000² × 6, steady", "methods", 0.2, " s", True, _steady("estarfm")),
    Target("fsdaf", "FSDAF 2000² × 6, steady", "methods", 1.0, " s", True, _steady("fsdaf")),
    Target("fsdaf-host", "FSDAF 2000² × 6, host work", "methods", 1.0, " CPU-s", True, _host_cpu("fsdaf")),
    Target("biastf-floor-per-band", "BiaSTF inference / bare forward, per-band TF32", "biastf", 1.0, "", True,
           _over_floor("per-band", "tensorfloat32")),
    Target("biastf-floor-multiband", "BiaSTF inference / bare forward, multiband bf16", "biastf", 1.0, "", True,
           _over_floor("multiband", "bfloat16")),
    Target("biastf-zarr-first", "BiaSTF Zarr → Zarr 2000², first run of a process / warm", "compile", 2.0, "", True,
           _zarr_first_over_warm),
    Target("biastf-zarr-warm", "BiaSTF Zarr → Zarr 2000², warm / kernel", "biastf", 1.1, "", True,
           _zarr_warm_over_kernel),
    Target("training-float32", "Training stage B / stage G, float32", "biastf", 0.9, "", False,
           _stage_b_over_g("float32")),
    Target("training-bfloat16", "Training stage B / stage G, bfloat16", "biastf", 0.9, "", False,
           _stage_b_over_g("bfloat16")),
    Target("series", "fuse_series 10000² × 6 × 12, end to end / kernel alone", "series", 0.7, "", False, _series),
)

CPU_TARGETS: tuple[Target, ...] = (
    Target("estarfm-cpu", "ESTARFM 2000² × 6, steady", "methods", 60.0, " s", True, _steady("estarfm")),
    Target("fsdaf-cpu", "FSDAF 2000² × 6, steady", "methods", 25.0, " s", True, _steady("fsdaf")),
    Target("one-shot-warm", "One-shot ESTARFM on zhu_estarfm, warm cache", "startup", 2.0, " s", True,
           _startup("whole process, warm cache")),
    Target("one-shot-cold", "One-shot ESTARFM on zhu_estarfm, cold cache", "startup", 4.0, " s", True,
           _startup("whole process, cold cache")),
)


def _child_json(path: str, run: str) -> Path:
    """Where a child run writes its own JSON: beside ours, ``bench_targets.json`` -> ``bench_targets.methods.json``."""
    return Path(path).with_suffix(f".{run}.json")


def _run_child(run: Run, out: Path) -> tuple[Mapping[str, Any] | None, str]:
    """Run ``run`` in a fresh process, writing its JSON to ``out``; that JSON and, if none, why."""
    command, env = child_command(run.benchmark, *run.args, "--json", str(out))
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=run.timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {run.timeout:.0f} s"
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"exit code {done.returncode}: {tail[0]}"
    return json.loads(out.read_text()), ""


def _table(records: Sequence[Mapping[str, Any]]) -> str:
    head = f"{'target':48s} {'limit':>10s} {'measured':>10s} {'of limit':>9s}  status"
    lines = [head, "-" * len(head)]
    for r in records:
        measured = "-" if r["measured"] is None else f"{r['measured']:.3g}"
        ratio = "-" if r["of_limit"] is None else f"{r['of_limit']:.2f}"
        status = {True: "met", False: "NOT MET", None: "not measured"}[r["met"]]
        lines.append(f"{r['work'][:48]:48s} {r['limit']:>10s} {measured:>10s} {ratio:>9s}  {status}: {r['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); 0 when every chosen target was measured."""
    parser = argparse.ArgumentParser(prog="stf bench targets", description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU targets (default: the CPU ones)")
    parser.add_argument("--only", nargs="+", help="target names to measure (default: all of the device's)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--json", default="bench_targets.json", help="output JSON path")
    parser.add_argument(
        "--reuse", action="store_true",
        help="judge from the children's JSON already beside --json, running none (runs split over machines' time "
        "limits); a target whose child's JSON is missing is not measured",
    )
    args = parser.parse_args(argv)

    targets = GPU_TARGETS if args.gpu else CPU_TARGETS
    if args.list:
        for t in targets:
            print(f"{t.name:24s} {t.work} ({t.limit_text})")
        return 0
    names = [t.name for t in targets]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; the {'GPU' if args.gpu else 'CPU'} targets are {names}.")
    chosen = [t for t in targets if not args.only or t.name in args.only]
    info = describe_machine(with_jax=False)
    print(f"machine: {info}", flush=True)
    results: dict[str, Mapping[str, Any]] = {}
    failures: dict[str, str] = {}
    for run in runs(args.gpu, os.cpu_count() or 1).values():
        if not any(t.run == run.name for t in chosen):
            continue
        out = _child_json(args.json, run.name)
        if args.reuse:  # never a new run: a child's JSON that is missing leaves its targets not measured
            if out.exists():
                print(f"reading {out} (stf bench {run.benchmark} of an earlier run)", flush=True)
                results[run.name] = json.loads(out.read_text())
            else:
                failures[run.name] = f"--reuse: no {out.name} from an earlier run"
            continue
        print(f"running stf bench {run.benchmark} {' '.join(run.args)}", flush=True)
        result, why = _run_child(run, out)
        if result is None:
            failures[run.name] = why
            print(f"  {why}", flush=True)
        else:
            results[run.name] = result
    records = [t.judge(results) for t in chosen]
    for record, target in zip(records, chosen, strict=True):
        if target.run in failures:
            record["note"] = f"its run failed: {failures[target.run]}"
    print(_table(records))
    write_result(args.json, info, args, records)
    return 0 if all(r["met"] is not None for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
