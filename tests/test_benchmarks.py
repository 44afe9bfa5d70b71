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
    assert f"benchmarks: {', '.join(names)}" in capsys.readouterr().out
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
