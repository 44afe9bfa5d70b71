"""The clone's benchmarks (``benchmarks/``): each uses only public names of ``stf_pipeline``, and
``stf bench`` finds, lists and imports every one."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from stf_pipeline.cli import BENCHMARKS, benchmark_names, load_benchmark, main

MODULES = sorted(BENCHMARKS.glob("*.py"))


def stf_names(source: str) -> list[str]:
    """Every dotted name of ``stf_pipeline`` that ``source`` imports or reaches by attribute from an
    imported name (``biastf.make_networks`` after ``from stf_pipeline.methods import biastf``)."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stf_pipeline":
                    names.append(alias.name)
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else "stf_pipeline"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("stf_pipeline"):
            for alias in node.names:
                names.append(f"{node.module}.{alias.name}")
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain: list[str] = []
            base: ast.expr = node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                names.append(".".join([bound[base.id], *reversed(chain)]))
    return names


def is_public(dotted: str) -> bool:
    """No part starts with an underscore, dunders (``__version__``) aside."""
    return not any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in dotted.split("."))


def resolve(dotted: str) -> object:
    """The object named ``dotted``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_checker_finds_private_names():
    source = (
        "import stf_pipeline as stf\nimport stf_pipeline.cluster\nfrom stf_pipeline import _export\n"
        "from stf_pipeline.methods import biastf\nfrom stf_pipeline.nn.train import _sample_step as step\n"
        "stf._private(1).shape\nbiastf._networks(cfg)\nstf_pipeline.cluster.machine_cores()\nstep.x\n"
        "stf.__version__\n"
    )
    assert sorted(n for n in stf_names(source) if not is_public(n)) == [
        "stf_pipeline._export", "stf_pipeline._private", "stf_pipeline.methods.biastf._networks",
        "stf_pipeline.nn.train._sample_step", "stf_pipeline.nn.train._sample_step.x",
    ]
    assert {"stf_pipeline.cluster.machine_cores", "stf_pipeline.__version__"} <= set(stf_names(source))


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_benchmarks_use_public_names_only(path: Path):
    names = stf_names(path.read_text())
    assert [n for n in names if not is_public(n)] == []
    for name in names:
        resolve(name)  # and every one exists


def test_stf_bench_lists_and_imports_every_benchmark(capsys):
    names = benchmark_names()
    assert names == sorted(p.stem for p in MODULES if not p.stem.startswith("_"))
    assert {"biastf", "methods", "scale", "startup", "stfdcnn"} <= set(names)
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert f"benchmarks: {', '.join(names)}" in " ".join(capsys.readouterr().out.split())  # help text wraps
    for name in names:
        module = load_benchmark(name)
        assert Path(module.__file__) == BENCHMARKS / f"{name}.py" and callable(module.main)


def test_study_page_is_the_rendering_of_its_records(tmp_path):
    """``docs/study.md`` is what ``stf bench biastf study --render-only`` makes of ``docs/study/``,
    and each run names the machine of its own record (records of several machines are merged)."""
    from benchmarks import _biastf_study as study

    root = BENCHMARKS.parent
    page = tmp_path / "study.md"
    study.main(["--render-only", "--out", str(root / "docs" / "study"), "--doc", str(page)])
    command = f"--out {root / 'docs' / 'study'} --doc {page}"
    rendered = page.read_text().replace(command, "--out docs/study --doc docs/study.md")
    assert rendered == (root / "docs" / "study.md").read_text()
    gpu = {"jax_backend": "gpu", "devices": ["NVIDIA H200"], "jax": "0.11.2", "cpu": "x86_64", "cores": 16}
    cpu = {"jax_backend": "cpu", "devices": ["TFRT_CPU_0"], "jax": "0.10.2", "cpu": "AMD EPYC", "cores": 2}
    assert study.machine_label(gpu) == "NVIDIA H200 (JAX 0.11.2)"
    assert study.machine_label(cpu) == "AMD EPYC, 2 cores (JAX 0.10.2)"


@pytest.mark.parametrize(("label", "weights", "power"), [("1/S (before)", "change", 1.0),
                                                         ("((S+eps)^2 + V^2)^-0.5", "variance", 0.5)])
def test_fusion_weights_study_fuses_as_biastf_does(label, weights, power):
    """``benchmarks._fusion_weights`` scores BiaSTF's own ``f``: its NumPy fusion of two directions
    equals :func:`stf_pipeline.methods.biastf.fuse_directions` with the same weights and windows."""
    import numpy as np

    from stf_pipeline.methods.biastf import fuse_directions

    load_benchmark("biastf")  # registers this folder as the package ``benchmarks``
    study = importlib.import_module("benchmarks._fusion_weights")

    rng = np.random.default_rng(5)
    factor = 4
    preds = rng.uniform(0.0, 0.5, (2, 2, 24, 28))
    coarse = np.repeat(np.repeat(rng.uniform(0.0, 0.5, (2, 2, 6, 7)), factor, -2), factor, -1)
    target = np.repeat(np.repeat(rng.uniform(0.0, 0.5, (2, 6, 7)), factor, -2), factor, -1)
    expected = study.fuse(preds, target[None] - coarse, study.CANDIDATES[label], factor)
    got = fuse_directions(
        preds.astype(np.float32), target.astype(np.float32), window=factor + 1, eps=study.EPS, weights=weights,
        coarse=coarse.astype(np.float32), power=power, spread_window=3 * factor + 1,
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)


def _gpu_results() -> dict:
    """Children's results shaped as ``stf bench methods / biastf / compile / scale --series`` write them."""
    scene = "synthetic 2000x2000x6"
    methods = [
        {"method": "starfm", "input": "zhu_estarfm", "first_s": 0.5, "steady_s": 0.4, "cpu_s": 0.9},  # a real set
        {"method": "starfm", "input": scene, "first_s": 5.1, "steady_s": 0.173, "cpu_s": 0.4, "rmse": 0.0374},
        {"method": "estarfm", "input": scene, "first_s": 7.0, "steady_s": 0.205, "cpu_s": 0.5, "rmse": 0.0375},
        {"method": "fsdaf", "input": scene, "first_s": 15.7, "steady_s": 0.81, "cpu_s": 0.8, "rmse": 0.0293},
    ]
    inference = [
        {"layout": layout, "dtype": dtype, "self_ensemble": views, "compute_s": compute, "floor_s": floor,
         "compute_over_floor": compute / floor, "kernel_s": kernel}
        for layout, dtype, views, compute, floor, kernel in [
            ("per-band", "tensorfloat32", 4, 0.721, 0.720, 0.75),
            ("multiband", "bfloat16", 4, 0.321, 0.305, 0.39),
            ("multiband", "tensorfloat32", 1, 0.2, 0.1, 0.25),  # another orientation count: not the default's row
            ("multiband", "tensorfloat32", 4, 0.66, 0.6, 0.687),
        ]
    ]
    training = [
        {"stage": stage, "layout": "multiband", "dtype": dtype, "patches_per_s": rate}
        for stage, dtype, rate in [("G", "float32", 2845.0), ("B, frozen G", "float32", 2731.2),
                                   ("G", "bfloat16", 3000.0), ("B, frozen G", "bfloat16", 2400.0)]
    ]
    zarr = {"size": 2000, "chunk": 1024, "layout": "multiband", "tensorfloat32_first_s": 7.0,
            "tensorfloat32_best_s": 1.29}
    compile_ = [{"method": "biastf", "backend": "jax", "first_s": 9.0, "warm_s": 1.3, "disk_s": 3.9, "ready_s": 2.6,
                 "first_over_warm": 6.92, "disk_over_warm": 3.0, "ready_over_warm": 2.0}]
    series = [{"end_to_end_vs_kernel": 0.6, "end_to_end_mpx_s": 12.0, "kernel_only_mpx_s": 20.0, "wall_s": 83.0,
               "peak_rss_bytes": 30 * 2**30}]
    return {"methods": {"results": methods}, "biastf": {"inference": inference, "training": training, "zarr": zarr},
            "compile": {"results": compile_}, "series": {"series": series}}


def test_targets_are_judged_from_the_childrens_numbers():
    """Each GPU target's value is the hand computation from the children's records; met or not by its limit."""
    targets = load_benchmark("targets")
    records = {r["target"]: r for r in (t.judge(_gpu_results()) for t in targets.GPU_TARGETS)}
    expected = {
        "starfm": (0.173, True), "estarfm": (0.205, False), "fsdaf": (0.81, True), "fsdaf-host": (0.8, True),
        "biastf-floor-per-band": (0.721 / 0.720, False), "biastf-floor-multiband": (0.321 / 0.305, False),
        "biastf-zarr-first": (3.0, False), "biastf-zarr-warm": (1.29 / 0.687, False),
        "training-float32": (2731.2 / 2845.0, True), "training-bfloat16": (0.8, False), "series": (0.6, False),
    }
    assert set(records) == set(expected)
    for name, (value, met) in expected.items():
        assert records[name]["measured"] == pytest.approx(value, rel=1e-12), name
        assert records[name]["met"] is met, name
    assert records["estarfm"]["limit"] == "≤ 0.2 s" and records["estarfm"]["of_limit"] == pytest.approx(1.025)
    assert records["training-float32"]["limit"] == "≥ 0.9"


def test_a_target_whose_run_failed_or_lacks_the_record_is_not_measured():
    targets = load_benchmark("targets")
    results = _gpu_results()
    del results["series"]
    results["methods"]["results"] = [r for r in results["methods"]["results"] if r["method"] != "fsdaf"]
    records = {r["target"]: r for r in (t.judge(results) for t in targets.GPU_TARGETS)}
    assert records["series"]["met"] is None and "gave no result" in records["series"]["note"]
    assert records["fsdaf"]["met"] is None and records["fsdaf"]["measured"] is None
    assert records["starfm"]["met"] is True


def test_stf_bench_targets_reports_a_failed_child_and_writes_json(tmp_path, monkeypatch, capsys):
    """A child that fails leaves its targets "not measured" in the table and the JSON; exit code 1."""
    import json

    targets = load_benchmark("targets")
    failing = targets.Run("startup", "startup", ("--set", "no_such_set", "--repeat", "1"), 120)
    monkeypatch.setattr(targets, "runs", lambda gpu, cores: {"startup": failing})
    out = tmp_path / "t.json"
    assert targets.main(["--only", "one-shot-warm", "--json", str(out)]) == 1
    written = json.loads(out.read_text())
    assert written["machine"]["cores"] >= 1
    [record] = written["results"]
    assert record["target"] == "one-shot-warm" and record["met"] is None
    assert "its run failed: exit code" in record["note"]
    assert "not measured" in capsys.readouterr().out


def test_stf_bench_targets_reuse_judges_earlier_children_without_running_them(tmp_path, monkeypatch):
    """``--reuse`` reads the children's JSON beside ``--json`` (written by earlier, split runs) and
    names the machine each number was measured on."""
    import json
    import subprocess

    targets = load_benchmark("targets")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("--reuse ran a child"))
    out = tmp_path / "t.json"
    gpu = {"gpus": ["NVIDIA H100 80GB HBM3, 81559 MiB"], "cores": 16}
    for run, result in _gpu_results().items():
        (tmp_path / f"t.{run}.json").write_text(json.dumps({"machine": gpu, **result}))
    assert targets.main(["--gpu", "--reuse", "--json", str(out)]) == 0
    records = {r["target"]: r for r in json.loads(out.read_text())["results"]}
    assert records["estarfm"]["measured"] == 0.205 and records["estarfm"]["met"] is False
    assert records["series"]["measured_on"] == "NVIDIA H100 80GB HBM3, 81559 MiB"
    (tmp_path / "t.compile.json").unlink()  # a child that did not run then: its target not measured, nothing run
    assert targets.main(["--gpu", "--reuse", "--json", str(out)]) == 1
    records = {r["target"]: r for r in json.loads(out.read_text())["results"]}
    assert records["biastf-zarr-first"]["met"] is None and "no t.compile.json" in records["biastf-zarr-first"]["note"]
    assert records["series"]["met"] is False
