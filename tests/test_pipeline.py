"""Pipeline configs (frozen, validated, unknown keys named) and end-to-end runs on tiny cubes."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

import stf_pipeline as stf
from stf_pipeline.catalog import data_root
from stf_pipeline.config import MethodRun, PipelineConfig, load_pipeline
from stf_pipeline.exceptions import ConfigError
from stf_pipeline.runner import run, run_compare, train_options
from stf_pipeline.series import default_model_dir

REPO = Path(__file__).resolve().parents[1]
TINY = {"height": 60, "width": 80, "n_times": 5, "seed": 3}
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Pipelines write below the folder they run from: run every test in its own."""
    monkeypatch.chdir(tmp_path)


def tiny_spec(tmp_path, **overrides):
    spec = {
        "name": "tiny",
        "cube": {"synthetic": dict(TINY)},
        "output": "out",
        "methods": [{"name": "delta", "params": {"window": 3}}],
    }
    spec.update(overrides)
    return spec


def test_shipped_pipelines_load():
    demo = load_pipeline(REPO / "pipelines" / "demo.yaml")
    assert demo.cube.kind == "synthetic" and demo.cube.options["height"] == 480
    assert demo.write_cube and demo.evaluate and demo.figures and demo.cluster is None
    assert [m.method for m in demo.methods][0] == "delta"
    for path in (REPO / "pipelines").glob("*.yaml"):
        assert isinstance(load_pipeline(path), PipelineConfig)


def test_config_defaults_and_forms(tmp_path):
    config = PipelineConfig.from_mapping(
        {"cube": {"catalog": "zhu_estarfm"}, "methods": ["delta"], "targets": ["2001-07-11"], "chunks": [128, 64]},
        source="x/my_run.yaml",
    )
    assert config.name == "my_run" and config.output == Path("out") / "my_run"
    assert config.cube.options == {"name": "zhu_estarfm"}
    assert config.methods == (MethodRun("delta"),)
    assert config.targets == ("2001-07-11",) and config.chunks == (128, 64)
    with pytest.raises(AttributeError):
        config.name = "other"  # frozen
    zarr = PipelineConfig.from_mapping({"cube": {"zarr": {"path": "a.zarr"}}})
    assert zarr.cube.options == {"path": "a.zarr"} and zarr.methods == ()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s.update(methdos=[]),
            r"unknown key 'methdos'; valid keys are \['name', 'cube', 'methods', 'output'",
        ),
        (lambda s: s.pop("cube"), r"missing required key 'cube'"),
        (lambda s: s.update(cube={"synthetic": {}, "zarr": "a.zarr"}), r"cube must have exactly one of"),
        (
            lambda s: s.update(cube={"hdf5": "a.h5"}),
            r"cube: unknown key 'hdf5'; valid keys are \['synthetic', 'catalog', 'zarr'\]",
        ),
        (
            lambda s: s["cube"]["synthetic"].update(size=5),
            r"cube.synthetic: unknown key 'size'; valid keys are \['height'",
        ),
        (lambda s: s.update(cube={"catalog": {"name": "cia", "path": "x"}}), r"cube.catalog: unknown key 'path'"),
        (lambda s: s.update(methods=[{"name": "magic"}]), r"methods\[0\]: unknown method 'magic'; choose one of \["),
        (lambda s: s.update(methods=[{"name": "delta", "param": {}}]), r"methods\[0\]: unknown key 'param'"),
        (lambda s: s.update(methods=[{"name": "delta", "params": [3]}]), r"methods\[0\].params must be a mapping"),
        (lambda s: s.update(methods=[{"name": "delta", "train": 5}]), r"methods\[0\].train must be a mapping"),
        (lambda s: s.update(methods={"delta": {}}), r"methods must be a list"),
        (lambda s: s.update(evaluate="yes"), r"evaluate must be true or false, got 'yes'"),
        (lambda s: s.update(targets="2004-05-02"), r"targets must be a non-empty list of dates or null"),
        (lambda s: s.update(targets=["someday"]), r"targets \['someday'\] must be ISO dates"),
        (lambda s: s.update(chunks=[0, 64]), r"chunks must be \[y, x\] positive integers or null"),
        (lambda s: s.update(cluster=[1]), r"cluster must be a mapping or null"),
        (lambda s: s.update(cluster={"nodes": 3}), r"unknown cluster key\(s\) \['nodes'\]; valid keys are"),
    ],
)
def test_config_errors_name_the_key(tmp_path, edit, message):
    spec = tiny_spec(tmp_path)
    edit(spec)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_config_file_errors(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"pipeline file .*absent.yaml does not exist; pass a YAML file or the name of a shipped pipeline "
        r"\(biastf-synthetic, .*demo\)",
    ):
        load_pipeline(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cube: {synthetic: [")
    with pytest.raises(ConfigError, match=r"pipeline .*bad.yaml is not valid YAML"):
        load_pipeline(bad)


def test_bad_method_params_fail_before_any_work(tmp_path):
    config = PipelineConfig.from_mapping(tiny_spec(tmp_path, methods=[{"name": "delta", "params": {"window": 4}}]))
    with pytest.raises(
        ConfigError, match=r"method 'delta' params \{'window': 4\}: delta: window must be a positive odd"
    ):
        run(config)
    config = PipelineConfig.from_mapping(tiny_spec(tmp_path, methods=[{"name": "delta", "params": {"radius": 4}}]))
    with pytest.raises(ConfigError, match=r"method 'delta' params \{'radius': 4\}"):
        run(config)
    config = PipelineConfig.from_mapping(tiny_spec(tmp_path, methods=[{"name": "delta", "train": {"epochs": 1}}]))
    with pytest.raises(ConfigError, match=r"method 'delta' is not learned; remove its 'train' entry"):
        run(config)
    assert not Path("out").exists()


def test_run_synthetic_end_to_end_matches_library_calls(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stf_pipeline")
    result = run(PipelineConfig.from_mapping(tiny_spec(tmp_path)))
    out = Path("out")
    assert result.cube_path == out / "cube.zarr" and result.fused == {"delta": out / "fused_delta.zarr"}
    assert any("stf cube" in line and "coarse-only" in line for line in caplog.messages)  # stf info of the written cube
    assert not result.reused
    cube = stf.open_cube(out / "cube.zarr")
    scores = result.scores["delta"]
    targets = cube["time"].values[cube["fine_valid"].values == 0]
    np.testing.assert_array_equal(scores["time"].values, targets)
    for t in targets:  # independent: one stf.fuse + stf.evaluate per date
        pred = stf.fuse(cube, t, method="delta", window=3)
        expected = stf.evaluate(pred, cube["fine_truth"].sel(time=t), ratio=1 / 20)
        np.testing.assert_allclose(scores["rmse"].sel(time=t).values, expected["rmse"].values, rtol=1e-6)
        np.testing.assert_allclose(float(scores["ergas"].sel(time=t)), float(expected["ergas"]), rtol=1e-6)
    saved = json.loads((out / "scores_delta.json").read_text())
    first = str(np.datetime_as_string(targets[0], unit="D"))
    assert saved[first]["rmse"]["red"] == pytest.approx(float(scores["rmse"].sel(time=targets[0], band="red")))
    assert len(result.figures) == 2 and all(p.exists() and p.stat().st_size > 1000 for p in result.figures)


def test_run_from_zarr_with_explicit_targets_and_no_extras(tmp_path):
    store = stf.write_cube(stf.synthetic_scene(**TINY), tmp_path / "scene.zarr")
    target = str(np.datetime_as_string(stf.open_cube(store)["time"].values[1], unit="D"))
    spec = tiny_spec(tmp_path, cube={"zarr": str(store)}, write_cube=False, targets=[target], evaluate=False,
                     figures=False)
    result = run(PipelineConfig.from_mapping(spec))
    assert result.cube_path is None and not result.scores and not result.figures
    fused = result.fused["delta"]
    assert not Path("out/cube.zarr").exists()
    ds = xr.open_zarr(fused)
    assert list(ds["source"].values).count("fused") == 1


@pytest.mark.skipif(not (data_root() / "imagefusion_kranj").exists(), reason="shared real data not present")
def test_run_catalog_scores_only_dates_with_truth(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stf_pipeline")
    # 2020-03-16 has MODIS only (no truth), 2020-03-17 is the held-out Landsat date
    spec = tiny_spec(tmp_path, cube={"catalog": "imagefusion_kranj"}, write_cube=False,
                     targets=["2020-03-16", "2020-03-17"])
    result = run(PipelineConfig.from_mapping(spec))
    scores = result.scores["delta"]
    assert [str(np.datetime_as_string(t, unit="D")) for t in scores["time"].values] == ["2020-03-17"]
    assert float(scores["cc"].mean()) > 0.5
    assert any("composites_2020-03-17.png" in line for line in caplog.messages)


def test_train_options_default_to_catalog_split_or_fine_dates():
    cube = stf.synthetic_scene(**TINY)
    run_ = MethodRun("biastf", train={"config": "tiny"})
    fine_dates = [str(np.datetime_as_string(t, unit="D")) for t in cube["time"].values[cube["fine_valid"].values > 0]]
    assert train_options(run_, cube) == {"config": "tiny", "train_times": fine_dates}
    cube.attrs["stf_train_times"] = ["2004-04-16"]
    assert train_options(run_, cube)["train_times"] == ["2004-04-16"]
    explicit = MethodRun("biastf", train={"train_times": ["2004-05-18"]})
    assert train_options(explicit, cube)["train_times"] == ["2004-05-18"]


def test_run_compare_writes_the_table(tmp_path):
    spec = tiny_spec(tmp_path, write_cube=False)
    comparison = run_compare(PipelineConfig.from_mapping(spec), out=tmp_path / "cmp", figures=False)
    assert "delta" in comparison.to_markdown()
    assert (tmp_path / "cmp" / "compare.csv").exists()
    with pytest.raises(ConfigError, match=r"'methods' is empty; list the methods to compare"):
        run_compare(PipelineConfig.from_mapping(tiny_spec(tmp_path, methods=[])))


@pytest.mark.slow
def test_run_on_a_local_cluster(tmp_path):
    spec = tiny_spec(tmp_path, cluster={"n_workers": 1, "threads_per_worker": 1}, figures=False)
    result = run(PipelineConfig.from_mapping(spec))
    assert "delta" in result.scores


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("stf_pipeline.methods.biastf") is None, reason="biastf not present")
def test_run_trains_a_learned_method(tmp_path):
    spec = tiny_spec(tmp_path, methods=[{"name": "biastf", "train": {"config": "tiny"}}], figures=False)
    result = run(PipelineConfig.from_mapping(spec))
    assert np.isfinite(result.scores["biastf"]["rmse"].values).all()
    model = default_model_dir(Path(result.fused["biastf"]))  # beside the fused store, named in the summary
    assert (model / "loss_curves.png").is_file()
    assert f"  biastf model: {model} (loss curves: {model / 'loss_curves.png'})" in result.summary()


def test_variants_extend_a_base_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_spec(tmp_path, evaluate=False)))
    variant = tmp_path / "sub" / "variant.yaml"
    variant.parent.mkdir()
    variant.write_text(yaml.safe_dump({
        "extends": "../base.yaml",
        "name": "variant",
        "cube": {"synthetic": {"seed": 9}},
        "methods": [{"name": "starfm"}],
    }))
    config = load_pipeline(variant)
    assert config.name == "variant" and not config.evaluate
    assert dict(config.cube.options) == {**TINY, "seed": 9}
    assert [m.method for m in config.methods] == ["starfm"]
    switch = tmp_path / "switch.yaml"
    switch.write_text(yaml.safe_dump({"extends": "base.yaml", "cube": {"synthetic": None, "catalog": "cia"}}))
    assert load_pipeline(switch).cube.kind == "catalog"
    loop = tmp_path / "loop.yaml"
    loop.write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match=r"pipeline .*loop.yaml extends itself"):
        load_pipeline(loop)
    missing = tmp_path / "missing_base.yaml"
    missing.write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"pipeline file .*nowhere.yaml does not exist"):
        load_pipeline(missing)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml must be a mapping of pipeline keys, got int"):
        load_pipeline(scalar)


def test_rerun_reuses_the_cube_and_the_fused_store(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stf_pipeline")
    config = PipelineConfig.from_mapping(tiny_spec(tmp_path, figures=False))
    first = run(config)

    def stamps():
        return {p: p.stat().st_mtime_ns for p in Path("out/fused_delta.zarr/fine").rglob("*") if p.is_file()}

    stamp = stamps()
    caplog.clear()
    again = run(config)
    assert again.reused == ("cube", "delta")
    assert "[tiny] reusing out/cube.zarr (written from this cube by an earlier run)" in caplog.messages
    assert any(m.startswith("reusing out/fused_delta.zarr") for m in caplog.messages)  # said by fuse_series
    assert not any("fusing with" in m for m in caplog.messages)
    assert stamps() == stamp  # no chunk rewritten
    xr.testing.assert_identical(again.scores["delta"], first.scores["delta"])
    summary = again.summary()
    assert "  cube: out/cube.zarr (reused)" in summary and "  delta: out/fused_delta.zarr (reused)" in summary
    assert "scores of delta" in summary
    # another request in the same place: an error until the user says to replace it
    other = PipelineConfig.from_mapping(
        tiny_spec(tmp_path, figures=False, methods=[{"name": "delta", "params": {"window": 5}}])
    )
    with pytest.raises(stf.StoreError, match=r"fused_delta.zarr holds another .*[Pp]ass overwrite=True"):
        run(other)
    assert run(other, overwrite=True).reused == ("cube",)
    # another cube in the same place
    moved = PipelineConfig.from_mapping(tiny_spec(tmp_path, cube={"synthetic": {**TINY, "seed": 4}}))
    with pytest.raises(
        stf.StoreError, match=r"out/cube.zarr holds a cube written from another source; pass overwrite=True"
    ):
        run(moved)


def test_user_choices_override_the_pipeline(tmp_path):
    config = PipelineConfig.from_mapping(tiny_spec(tmp_path))
    cube = stf.synthetic_scene(**TINY)
    target = str(np.datetime_as_string(cube["time"].values[2], unit="D"))
    result = run(config, output=tmp_path / "elsewhere", methods=["estarfm", "delta"], targets=[target])
    assert list(result.fused) == ["estarfm", "delta"]
    assert result.fused["delta"] == tmp_path / "elsewhere" / "fused_delta.zarr"
    for name in ("estarfm", "delta"):
        fused = xr.open_zarr(result.fused[name])
        fused_times = fused["time"].values[fused["source"].values == "fused"]
        assert [str(np.datetime_as_string(t, unit="D")) for t in fused_times] == [target]
    assert json.loads(xr.open_zarr(result.fused["delta"]).attrs["stf_params"])["window"] == 3  # the pipeline's params
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['magic'\]; choose among the pipeline's \['delta'\]"):
        config.with_overrides(methods=["magic"])
    with pytest.raises(ConfigError, match=r"targets \['July'\] must be ISO dates"):
        config.with_overrides(targets=["July"])
    with pytest.raises(ConfigError, match=r"a data root is only for a catalog cube; this one is synthetic"):
        config.with_overrides(root=tmp_path)
    catalog = PipelineConfig.from_mapping({"cube": {"catalog": "lgc"}}).with_overrides(root=tmp_path)
    assert catalog.cube.options == {"name": "lgc", "root": str(tmp_path)}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"name": "../../../x"}, r"name '../../../x' must be a plain name"),
        ({"name": "a/b"}, r"name 'a/b' must be a plain name"),
        ({"output": "../outside"}, r"output '../outside' must be a relative path without '..'"),
        ({"output": "/tmp/x"}, r"output '/tmp/x' must be a relative path .* stf run PIPELINE --out DIR"),
    ],
)
def test_pipeline_files_cannot_write_outside_their_folder(tmp_path, edit, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(tmp_path, **edit)))
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_shipped_pipelines_by_name_from_any_folder(tmp_path):
    from stf_pipeline.config import PIPELINE_DIR, pipeline_names, pipeline_path

    assert "demo" in pipeline_names()
    assert pipeline_path("demo") == pipeline_path("demo.yaml") == PIPELINE_DIR / "demo.yaml"
    assert pipeline_path("pipelines/demo.yaml") == PIPELINE_DIR / "demo.yaml"  # cwd is tmp_path: no such file here
    assert load_pipeline("demo").name == "demo"
    own = tmp_path / "demo.yaml"
    own.write_text(yaml.safe_dump(tiny_spec(tmp_path, name="mine")))
    assert load_pipeline("demo.yaml").name == "mine"  # a file in the working folder comes first


def test_a_cube_that_is_its_own_output_is_not_rewritten(tmp_path):
    store = stf.write_cube(stf.synthetic_scene(**TINY), Path("out") / "cube.zarr")
    before = stf.open_cube(store).compute()
    spec = tiny_spec(tmp_path, cube={"zarr": "out/cube.zarr"}, figures=False, evaluate=False)
    result = run(PipelineConfig.from_mapping(spec))
    assert result.reused == ("cube",)
    xr.testing.assert_identical(stf.open_cube(store).compute(), before)
