"""stf.compare: same tasks for every method, scores equal to stf.evaluate, Table-2 outputs and figures."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import stf_pipeline as stf
from stf_pipeline.comparison import Comparison, compare, method_runs
from stf_pipeline.exceptions import ConfigError, MethodError, TaskError


@pytest.fixture(scope="module")
def cube():
    return stf.synthetic_scene(height=48, width=48, n_times=4, seed=3, fine_times=[0, 2, 3], coarse_factor=8).compute()


@pytest.fixture(scope="module")
def result(cube, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    methods = {"delta": {}, "delta_w3": {"method": "delta", "window": 3}}
    # a model's loss history is drawn as a loss-curve figure (delta itself ignores the model)
    model = SimpleNamespace(history={"stage1": {"step": [1, 2, 3], "loss": [1.0, 0.5, 0.2]}})
    return compare(cube, methods=methods, models={"delta_w3": model}, out=out), out


def test_scores_equal_evaluate_on_the_same_task(cube, result):
    res, _ = result
    assert isinstance(res, Comparison)
    assert res.targets == ["2004-05-02"]  # the held-out date (fine NaN, truth present)
    assert list(res.scores["run"].values) == ["delta", "delta_w3"]
    for target in res.targets:
        pred = stf.fuse(cube, target, method="delta", window=3)
        truth = cube["fine_truth"].sel(time=target)
        expected = stf.evaluate(pred, truth, ratio=1 / 8)
        got = res.scores.sel(target=target, run="delta_w3")
        for name in ("rmse", "cc", "ssim", "bias", "mae", "ergas", "sam", "n_valid"):
            np.testing.assert_allclose(got[name].values, expected[name].values, rtol=1e-12, err_msg=name)
        np.testing.assert_array_equal(res.predictions.sel(target=target, run="delta_w3").values, pred.values)
        assert res.pairs[target]["delta"] == res.pairs[target]["delta_w3"] == [str(p)[:10] for p in pred.attrs["pairs"]]
    assert (res.scores["time_s"] > 0).all()


def test_table_has_the_table2_layout_and_marks_the_best(result):
    res, _ = result
    table = res.table()
    assert table.index.names == ["metric", "date", "band"]
    assert list(table.columns) == ["delta", "delta_w3", "best"]
    n_bands, n_dates = 6, 1
    assert len(table) == n_dates * (5 * n_bands + 3)  # 5 per-band metrics, ERGAS, SAM, time
    assert list(table.index.get_level_values("metric").unique()) == [
        "rmse", "mae", "bias", "cc", "ssim", "ergas", "sam", "time_s"
    ]
    for (metric, _, _), row in table.iterrows():
        values = {"delta": row["delta"], "delta_w3": row["delta_w3"]}
        if metric in ("cc", "ssim"):
            key = {k: -v for k, v in values.items()}
        elif metric == "bias":
            key = {k: abs(v) for k, v in values.items()}
        else:
            key = values
        expected = ", ".join(k for k, v in key.items() if v == min(key.values()))
        assert row["best"] == expected, (metric, values)


def test_ties_are_all_marked(cube):
    res = compare(cube, methods={"a": {"method": "delta"}, "b": {"method": "delta"}})
    table = res.table().drop(index="time_s", level="metric")
    assert (table["best"] == "a, b").all()
    rows = [line for line in res.to_markdown().splitlines() if line.startswith("| ") and "Time" not in line][1:]
    assert all(line.count("**") == 4 for line in rows)
    assert res.tidy().query("metric == 'rmse'")["best"].all()


def test_outputs_written(result):
    res, out = result
    csv = pd.read_csv(out / "compare.csv", index_col=[0, 1, 2])
    pd.testing.assert_frame_equal(csv, res.table(), check_exact=False, rtol=1e-5, check_names=False)
    markdown = (out / "compare.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(res.table())
    table = res.table()
    for line, best in zip(rows, table["best"], strict=True):
        assert line.count("**") == 2 * len(best.split(", "))  # the best (or tied best) per row in bold
    assert "| RMSE | 2004-05-02 | nir |" in markdown and "ERGAS ratio" in markdown
    meta = json.loads((out / "compare.json").read_text())
    assert meta["targets"] == res.targets
    assert meta["methods"]["delta_w3"] == {"method": "delta", "params": {"window": 3}}
    assert set(meta["wall_time_s"]) == {"delta", "delta_w3"}
    assert len(meta["records"]) == 2 * len(res.table())
    for date in res.targets:
        for stem in ("composite_true", "composite_false", "change", "bias", "scatter"):
            assert (out / f"{stem}_{date}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "loss_delta_w3.png").exists() and not (out / "loss_delta.png").exists()


def test_cube_without_truth_var_hides_the_target(cube):
    plain = cube.drop_vars("fine_truth")
    with pytest.raises(TaskError, match="pass targets"):
        compare(plain, methods=["delta"])
    res = compare(plain, methods=["delta"], targets=["2004-05-18"], pairs=["2004-04-16", "2004-06-03"])
    hidden = plain.assign(fine=plain.fine.where(plain.time != np.datetime64("2004-05-18")))
    hidden = hidden.assign_coords(
        fine_valid=xr.where(hidden.time == np.datetime64("2004-05-18"), 0.0, hidden.fine_valid)
    )
    pred = stf.fuse(hidden, "2004-05-18", method="delta", pairs=["2004-04-16", "2004-06-03"])
    np.testing.assert_array_equal(res.predictions.isel(target=0, run=0).values, pred.values)
    np.testing.assert_array_equal(res.truth.isel(target=0).values, cube.fine.sel(time="2004-05-18").values)


def test_pairs_per_target_and_catalog_targets(cube):
    catalog_like = cube.assign_attrs(stf_targets=["2004-05-18"])
    res = compare(catalog_like, methods=["delta"], pairs={"2004-05-18": ["2004-06-03"]})
    assert res.targets == ["2004-05-18"]
    assert res.pairs == {"2004-05-18": {"delta": ["2004-06-03"]}}
    assert (res.table()["best"] == "").all() and "**" not in res.to_markdown()  # one method: no winner


def test_errors(cube):
    with pytest.raises(MethodError, match="unknown method"):
        compare(cube, methods=["nope"])
    with pytest.raises(ConfigError, match="unique"):
        method_runs(["delta", "delta"])
    with pytest.raises(ConfigError, match="no methods"):
        method_runs([])
    with pytest.raises(ConfigError, match="models given"):
        compare(cube, methods=["delta"], models={"starfm": object()})
    with pytest.raises(TaskError, match="not dates of the cube"):
        compare(cube, methods=["delta"], targets=["1999-01-01"])
    lonely = cube.isel(time=[1])  # no fine observation at all: nothing can run
    with pytest.raises(TaskError, match="no method could run"), pytest.warns(UserWarning, match="cannot run"):
        compare(lonely, methods=["delta"])


def test_stf_compare_command(tmp_path, capsys):
    from stf_pipeline.cli import main

    pipeline = tmp_path / "compare.yaml"
    pipeline.write_text(
        "name: tiny\n"
        "cube:\n"
        "  synthetic: {height: 40, width: 40, n_times: 4, seed: 1, fine_times: [0, 2, 3], coarse_factor: 8}\n"
        "write_cube: false\n"
        "methods:\n"
        "  - name: delta\n"
    )
    assert main(["compare", str(pipeline), "--no-figures", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| RMSE | 2004-05-02 | blue |" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.csv", "compare.json", "compare.md"]
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_method_that_cannot_run_is_skipped_not_fatal(cube):
    with pytest.warns(UserWarning, match="estarfm cannot run"):
        res = compare(cube, methods=["delta", "estarfm"], pairs=["2004-04-16"])  # ESTARFM needs two pairs
    assert "estarfm" in res.skipped["2004-05-02"]
    assert np.isnan(res.scores["rmse"].sel(run="estarfm")).all()
    assert np.isfinite(res.scores["rmse"].sel(run="delta")).all()
    assert (res.table()["best"] == "").all()  # one value per row: nothing to mark
    markdown = res.to_markdown()
    assert "| RMSE | 2004-05-02 | blue | " in markdown and " — |" in markdown and "Not run: estarfm" in markdown
    figs = res.figures()
    assert "composite_true_2004-05-02" in figs
    assert [ax.get_title() for ax in figs["composite_true_2004-05-02"].axes[:2]] == ["truth", "delta"]
