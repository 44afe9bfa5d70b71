"""The documentation site: it builds with warnings as errors, its navigation finds every page, the
benchmarks page is generated from the measurement files and up to date, the API reference covers
the public surface and the CLI page every command."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import stf_pipeline as stf

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load("hooks")
gen = _load("gen_benchmarks")


def _flatten(nav: list) -> list[str]:
    pages = []
    for entry in nav:
        if isinstance(entry, dict):
            for sub in entry.values():
                pages += _flatten(sub)
        else:
            pages.append(entry)
    return pages


def test_site_builds_without_warnings(tmp_path):
    """``mkdocs build --strict``: broken links, missing anchors, unresolved API paths and docstring
    warnings fail the build."""
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "WARNING" not in run.stderr, run.stderr
    api = (site / "api" / "index.html").read_text()
    for name in set(stf.__all__) - {"__version__"}:
        value = getattr(stf, name)
        if isinstance(value, ModuleType):
            value = getattr(value, name)
        assert f'id="{value.__module__}.{name}"' in api, name
    cli = (site / "cli" / "index.html").read_text()
    assert "usage: stf ingest" in cli and "stf-commands" not in cli
    bench = (site / "benchmarks" / "index.html").read_text()
    for path in (DOCS / "benchmarks").glob("*.json"):
        assert f'id="{path.stem}"' in bench
        for table in gen.load(path)["measurements"]:
            assert f'id="{table["id"]}"' in bench


def test_nav_orders_known_pages_and_keeps_unknown_ones(tmp_path):
    for page in ["index.md", "api.md", "benchmarks.md", "cube.md", "zeta.md", "alpha.md", "methods/biastf.md",
                 "methods/starfm.md", "methods/zz-new.md", "methods/index.md", "extra/one.md", "_draft.md"]:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text(f"# {page}\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "x.json").write_text("{}")
    (tmp_path / "hooks.py").write_text("")
    assert hooks.build_nav(tmp_path) == [
        "index.md",
        "cube.md",
        {"Methods": ["methods/index.md", "methods/starfm.md", "methods/biastf.md", "methods/zz-new.md"]},
        "alpha.md",
        {"Extra": ["extra/one.md"]},
        "zeta.md",
        "benchmarks.md",
        "api.md",
    ]


def test_nav_of_the_site_holds_every_page_once():
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    nav = _flatten(hooks.build_nav(DOCS))
    assert sorted(nav) == pages
    assert nav[0] == "index.md" and nav[-1] == "api.md"


def test_api_page_lists_every_public_name():
    text = (DOCS / "api.md").read_text()
    listed = re.findall(r"^::: stf_pipeline\.(\w+)\s*$", text, flags=re.MULTILINE)
    assert sorted(listed) == sorted(set(stf.__all__) - {"__version__"})
    resolved = hooks.public_paths(text)
    for path in re.findall(r"^::: (stf_pipeline\.[\w.]+)\s*$", resolved, flags=re.MULTILINE):
        module, _, name = path.rpartition(".")
        assert module != "stf_pipeline" or name not in stf.__all__, path
        obj = getattr(importlib.import_module(module), name)
        if name in stf.__all__:
            assert obj is getattr(importlib.import_module(module), name)
            assert obj.__module__ == module


def test_cli_page_has_every_command():
    from stf_pipeline.cli import build_parser

    text = hooks.command_help(build_parser(), width=90)
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == re.findall(r"^### `stf (\w+)`", text, flags=re.MULTILINE)
    with hooks._columns(90):
        for name, parser in sub.choices.items():
            assert f"### `stf {name}`" in text and f"```text\n{parser.format_help().rstrip()}\n```" in text
    assert "usage: stf ingest" in text
    assert hooks.CLI_MARKER in (DOCS / "cli.md").read_text()


def test_benchmarks_page_is_generated_from_the_json():
    assert (DOCS / "benchmarks.md").read_text() == gen.render(), "run: python docs/gen_benchmarks.py"


def test_every_measurement_names_hardware_date_and_command():
    files = sorted((DOCS / "benchmarks").glob("*.json"))
    assert files
    for path in files:
        for table in gen.load(path)["measurements"]:
            assert table["hardware"] and table["command"] and table["date"] >= "2026-01-01", path.name


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


GOOD = {
    "title": "Speed",
    "summary": "What was timed.",
    "measurements": [{
        "id": "one-scene",
        "caption": "One scene",
        "date": "2026-11-26",
        "hardware": "1 × NVIDIA H100",
        "command": "stf bench methods --gpu",
        "commit": "abc1234",
        "columns": ["method", "time (s)", "patches/s", "error"],
        "rows": [["STARFM | fast", 0.69, 23300, 1.6e-06], ["ESTARFM", 10.0, None, "3–4/6"]],
        "notes": "Steady runs.",
    }],
}


def test_render_writes_tables_with_their_hardware(tmp_path):
    _write(tmp_path / "b.json", {**GOOD, "order": 1, "title": "Second",
                                 "measurements": [{**GOOD["measurements"][0], "id": "other"}]})
    _write(tmp_path / "a.json", {**GOOD, "order": 2})
    page = gen.render(tmp_path)
    assert page.startswith(gen.HEADER)
    assert page.index("## Second") < page.index("## Speed")
    section = page[page.index("## Speed"):]
    assert section == (
        "## Speed {#a}\n\nWhat was timed.\n\n### One scene {#one-scene}\n\n"
        "| method | time (s) | patches/s | error |\n|---|---|---|---|\n"
        "| STARFM \\| fast | 0.69 | 23,300 | 1.6e-06 |\n| ESTARFM | 10 | — | 3–4/6 |\n\n"
        "**Hardware:** 1 × NVIDIA H100 · **Date:** 2026-11-26 · **Commit:** `abc1234`  \n"
        "**Command:** `stf bench methods --gpu`\n\nSteady runs.\n"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hardware": ""}, "measurement 1 'hardware' must be a non-empty string, got ''"),
        ({"hardware": {}}, "measurement 1 'hardware' is empty: say what machine the numbers come from"),
        ({"date": "26/11/2026"}, "measurement 1 'date' must be a date YYYY-MM-DD, got '26/11/2026'"),
        ({"command": None}, "measurement 1 'command' must be a non-empty string, got None"),
        ({"rows": [[1, 2]]}, "measurement 1 row 1 must be a list of 4 values (one per column)"),
        ({"rows": [[1, 2, 3, [4]]]}, "measurement 1 row 1 holds [4]: use a number, a string or null"),
        ({"columns": []}, "measurement 1 'columns' must be a non-empty list of strings"),
        ({"id": "One Scene"}, "measurement 1 'id' must be lower-case words joined by '-', got 'One Scene'"),
        ({"id": None}, "measurement 1 'id' must be a non-empty string, got None"),
    ],
)
def test_bad_measurement_files_are_named_with_the_fix(tmp_path, change, message):
    data = json.loads(json.dumps(GOOD))
    data["measurements"][0].update(change)
    path = _write(tmp_path / "speed.json", data)
    with pytest.raises(gen.BenchmarkFileError) as err:
        gen.load(path)
    assert str(err.value) == f"speed.json: {message}; see the format at the top of docs/gen_benchmarks.py."
    assert isinstance(err.value, stf.STFError)


def test_render_refuses_an_empty_folder_a_shared_id_and_a_bad_file_name(tmp_path):
    with pytest.raises(gen.BenchmarkFileError, match="no measurement files"):
        gen.render(tmp_path)
    _write(tmp_path / "a.json", GOOD)
    _write(tmp_path / "b.json", GOOD)
    with pytest.raises(gen.BenchmarkFileError, match="b.json: table id 'one-scene' is also used in a.json"):
        gen.render(tmp_path)
    with pytest.raises(gen.BenchmarkFileError, match="the file name must be lower-case words"):
        gen.load(_write(tmp_path / "My Bench.json", GOOD))


def test_a_bench_result_is_filed_with_its_machine(tmp_path):
    """``add``: the JSON that ``stf bench`` writes becomes tables with the machine as the hardware."""
    result = {
        "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gib": 23.5, "gpus": [], "python": "3.11.9",
                    "loadavg_start": [1.0, 0.5, 0.3], "jax": "0.10.2", "jax_backend": "cpu", "devices": ["cpu"]},
        "args": {"size": 256},
        "training": [{"stage": "G", "patches_per_s": 812.5, "history": [1, 2]}, {"stage": "B", "step_ms": 3.0}],
        "zarr": {"size": 256, "first_s": 2.5},
        "note": "not a table",
    }
    raw = _write(tmp_path / "bench.json", result)
    docs = tmp_path / "benchmarks"
    docs.mkdir()
    path = gen.add(raw, "nn", title="Training", command="stf bench biastf", date="2026-12-04", commit=None,
                   source=docs)
    gen.add(raw, "nn", title="ignored", command="stf bench biastf --repeats 2", date="2026-12-04", commit="ff00",
            source=docs)
    data = gen.load(path)
    assert data["title"] == "Training"
    assert [t["caption"] for t in data["measurements"]] == ["training", "zarr", "training", "zarr"]
    assert [t["id"] for t in data["measurements"]] == [
        "nn-training-2026-12-04", "nn-zarr-2026-12-04", "nn-training-2026-12-04-2", "nn-zarr-2026-12-04-2"]
    assert "### training {#nn-training-2026-12-04-2}" in gen.render(docs)
    training = data["measurements"][0]
    assert training["columns"] == ["stage", "patches_per_s", "step_ms"]
    assert training["rows"] == [["G", 812.5, None], ["B", None, 3.0]]
    assert data["measurements"][3]["commit"] == "ff00"
    assert gen.format_hardware(training["hardware"]) == (
        "JAX devices cpu; CPU AMD EPYC; cores 2; memory (GiB) 23.5; JAX 0.10.2; JAX backend cpu; Python 3.11.9; "
        "load average at start 1.0 / 0.5 / 0.3"
    )
    with pytest.raises(gen.BenchmarkFileError, match="no 'machine' description"):
        gen.from_bench({"results": []}, command="x", date="2026-12-04")


def test_cube_page_example_runs():
    """The example of docs/cube.md builds a valid cube and fuses it."""
    text = (DOCS / "cube.md").read_text()
    code = re.search(r"## Building a cube yourself\n\n```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/cube.md", "exec"), namespace)
    pred, coarse = namespace["pred"], namespace["coarse"]
    assert [str(t)[:10] for t in namespace["task"].pairs] == ["2001-05-24", "2001-08-12"]
    assert pred.shape == (2, 64, 64)
    # coarse = fine + 0.01 on every date, so fine + coarse change recovers the withheld fine image
    np.testing.assert_allclose(pred.values, coarse[1] - np.float32(0.01), rtol=0, atol=1e-6)


def test_sphinx_roles_become_code_linked_to_the_api_page():
    roles = _load("griffe_roles")
    targets = roles.public_targets()
    text = (
        "A cube (see :func:`stf_pipeline.validate_cube`), written by :func:`write_cube`; "
        ":class:`~stf_pipeline.exceptions.CubeError` if not; :func:`~stf_pipeline.cluster.start_cluster`, "
        ":mod:`stf_pipeline.parallel`, :func:`.nowhere` and :class:`Nowhere` are not on the API page; "
        ":func:`.write_cube` is."
    )
    assert roles.convert(text, "stf_pipeline.cube", targets) == (
        "A cube (see [`stf_pipeline.validate_cube`][stf_pipeline.cube.validate_cube]), written by "
        "[`write_cube`][stf_pipeline.cube.write_cube]; [`CubeError`][stf_pipeline.exceptions.CubeError] if not; "
        "`start_cluster`, `stf_pipeline.parallel`, `nowhere` and `Nowhere` are not on the API page; "
        "[`write_cube`][stf_pipeline.cube.write_cube] is."
    )
