"""``stf.compare``: run several methods on the same tasks, score them, and write the paper's table and figures.

(The module is ``comparison``, not ``compare``: importing a submodule named like the public
function would replace ``stf.compare`` by the module.)

For each target date and each method, :func:`compare` calls :func:`stf_pipeline.fuse` with the same
pair dates (unless the method takes fewer), times the fusion (graph build + compute; the input
dates are read into memory once beforehand, so the time is the method's own), and scores the prediction
against the held-out truth with :func:`stf_pipeline.evaluate`. The result, a :class:`Comparison`, holds
the scores as a Dataset, renders them laid out like Table 2 of the BiaSTF paper (rows metric × date × band, one column
per method, the best value per row marked) and writes CSV, Markdown, JSON and PNG figures.

The truth of a target date is ``fine_truth`` (cubes from :func:`stf_pipeline.synthetic_scene` and
:func:`stf_pipeline.open_catalog` carry it); a cube without it is scored against ``fine`` at the
target, which is then hidden from the methods.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import xarray as xr

from stf_pipeline.config import MethodRun
from stf_pipeline.cube import validate_cube
from stf_pipeline.exceptions import ConfigError, TaskError
from stf_pipeline.fusion import fuse
from stf_pipeline.methods import get_method
from stf_pipeline.metrics import HIGHER_IS_BETTER, PER_BAND, PER_SCENE, best_indices, evaluate
from stf_pipeline.task import DateLike, iso_date, resolve_task, to_datetime64, valid_fraction

#: rows of the table, in order; ``time_s`` is the wall time of the fusion
TABLE_METRICS: tuple[str, ...] = ("rmse", "mae", "bias", "cc", "ssim", "ergas", "sam", "time_s")
LABELS: dict[str, str] = {
    "rmse": "RMSE",
    "mae": "MAE",
    "bias": "Bias",
    "cc": "CC",
    "ssim": "SSIM",
    "ergas": "ERGAS",
    "sam": "SAM (rad)",
    "time_s": "Time (s)",
}
BEST_SEPARATOR = ", "


def method_runs(methods: Sequence[str | MethodRun] | Mapping[str, Mapping[str, Any] | None]) -> list[MethodRun]:
    """Normalise ``methods``: names or :class:`~stf_pipeline.config.MethodRun` objects, or
    ``{label: {"method": name, **params}}`` (``method`` defaults to the label).

    Raises
    ------
    MethodError
        For an unknown method.
    ConfigError
        For no methods, or two runs under one label.
    """
    if isinstance(methods, str):
        methods = [methods]
    runs: list[MethodRun] = []
    if isinstance(methods, Mapping):
        for label, spec in methods.items():
            params = dict(spec or {})
            method = str(params.pop("method", label))
            runs.append(MethodRun(method, params=params, label=str(label)))
    else:
        runs = [m if isinstance(m, MethodRun) else MethodRun(str(m)) for m in methods]
    if not runs:
        raise ConfigError("no methods to compare; pass e.g. methods=['delta', 'starfm'].")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"method labels must be unique, got {labels}; use a mapping {{label: {{'method': ...}}}}.")
    return runs


@dataclasses.dataclass
class Comparison:
    """Scores, predictions and provenance of a comparison; renders the table and figures.

    Attributes
    ----------
    scores : xarray.Dataset
        ``rmse, mae, bias, cc, ssim`` with dims ``(target, run, band)``; ``ergas, sam,
        n_valid, time_s`` with dims ``(target, run)``. ``run`` holds the method labels (not
        ``method``, which ``.sel`` would take for its own ``method=`` argument). NaN where a
        method could not run on a target (see ``skipped``).
    predictions : xarray.DataArray
        ``(target, run, band, y, x)`` computed predictions.
    truth, coarse, reference : xarray.DataArray
        ``(target, band, y, x)``: the truth, the coarse image at the target, and the fine image at
        the reference pair date (the latest pair before the target, else the first pair) used by
        the change maps.
    runs : list of MethodRun
    pairs : dict
        ``{target ISO date: {method label: [pair ISO dates]}}``.
    skipped : dict
        ``{target ISO date: {method label: reason}}`` for runs that could not be formed.
    histories : dict
        ``{method label: loss history}`` of learned methods (from their models).
    """

    scores: xr.Dataset
    predictions: xr.DataArray
    truth: xr.DataArray
    coarse: xr.DataArray
    reference: xr.DataArray
    runs: list[MethodRun]
    pairs: dict[str, dict[str, list[str]]]
    skipped: dict[str, dict[str, str]]
    histories: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        """ISO dates of the targets."""
        return [iso_date(t) for t in self.scores["target"].values]

    def tidy(self) -> pd.DataFrame:
        """Long table: one row per (target, method, metric, band) with its value and ``best`` flag."""
        table = self.table()
        rows = []
        for key, row in table.iterrows():
            metric, date, band = cast(tuple[str, str, str], key)  # the table's (metric, date, band) index
            for run in self.runs:
                rows.append(
                    {
                        "target": date,
                        "method": run.label,
                        "metric": metric,
                        "band": band,
                        "value": row[run.label],
                        "best": run.label in _split_best(row["best"]),
                    }
                )
        return pd.DataFrame(rows)

    def table(self) -> pd.DataFrame:
        """The scores laid out like the BiaSTF paper's Table 2.

        Rows are indexed by ``(metric, date, band)`` (band ``all`` for scene-wide metrics and
        wall time), one column per method, and a ``best`` column naming the best method of the
        row (several, joined by ``", "``, when they tie; none with fewer than two values): lowest RMSE,
        MAE, ERGAS, SAM and time; highest CC and SSIM; bias closest to 0.
        """
        labels = [r.label for r in self.runs]
        bands = [str(b) for b in self.scores["band"].values]
        records = []
        for metric in TABLE_METRICS:
            for i, date in enumerate(self.targets):
                for band in bands if metric in PER_BAND else ["all"]:
                    var = self.scores[metric].isel(target=i)
                    if metric in PER_BAND:
                        var = var.sel(band=band)
                    values = var.sel(run=labels).values.astype(np.float64)
                    best = best_indices(values, "rmse" if metric == "time_s" else metric)
                    if np.isfinite(values).sum() < 2:  # nothing to compare with
                        best = []
                    records.append(
                        {"metric": metric, "date": date, "band": band, **dict(zip(labels, values, strict=True)),
                         "best": BEST_SEPARATOR.join(labels[k] for k in best)}
                    )
        return pd.DataFrame.from_records(records).set_index(["metric", "date", "band"])

    def to_markdown(self, *, digits: int = 4) -> str:
        """Markdown version of :meth:`table`, the best value per row in bold."""
        labels = [r.label for r in self.runs]
        table = self.table()
        lines = [
            f"| Metric | Date | Band | {' | '.join(labels)} |",
            "|---|---|---|" + "---:|" * len(labels),
        ]
        for key, row in table.iterrows():
            metric, date, band = cast(tuple[str, str, str], key)  # the table's (metric, date, band) index
            cells = []
            for label in labels:
                value = row[label]
                text = "—" if not np.isfinite(value) else f"{value:.{2 if metric == 'time_s' else digits}f}"
                cells.append(f"**{text}**" if label in _split_best(row["best"]) else text)
            lines.append(f"| {LABELS[metric]} | {date} | {band} | {' | '.join(cells)} |")
        notes = [""]
        if len(labels) > 1:
            notes.append(
                "Best value per row in **bold**: lowest RMSE, MAE, ERGAS, SAM and time; highest CC and SSIM; "
                "bias closest to 0."
            )
        notes += [
            f"ERGAS ratio (fine/coarse pixel size) = {self.scores.attrs['ergas_ratio']:.4g}; "
            f"SSIM: Gaussian σ = 1.5, data range {self.scores.attrs['ssim_data_range']}. "
            "Time: wall-clock seconds of the fusion (inputs already in memory).",
        ]
        if len(self.scores["band"]) == 1:
            notes.append(
                "One band only: SAM (angle between spectra) is 0 or π and ERGAS reduces to a relative RMSE; "
                "read RMSE, CC and SSIM instead."
            )
        for date, by_method in self.pairs.items():
            used = "; ".join(f"{m}: {', '.join(p)}" for m, p in by_method.items())
            notes.append(f"Pairs for {date}: {used}.")
        for date, reasons in self.skipped.items():
            for label, reason in reasons.items():
                notes.append(f"Not run: {label} on {date}: {reason}")
        return "\n".join(lines + notes) + "\n"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary: provenance, wall times and the tidy records."""
        tidy = self.tidy()
        tidy["value"] = [None if not np.isfinite(v) else float(v) for v in tidy["value"]]
        return {
            "targets": self.targets,
            "methods": {r.label: {"method": r.method, "params": dict(sorted(r.params.items()))} for r in self.runs},
            "bands": [str(b) for b in self.scores["band"].values],
            "pairs": self.pairs,
            "skipped": self.skipped,
            "ergas_ratio": self.scores.attrs["ergas_ratio"],
            "ssim_data_range": self.scores.attrs["ssim_data_range"],
            "wall_time_s": {
                r.label: {d: _finite(self.scores["time_s"].sel(run=r.label).values[i])
                          for i, d in enumerate(self.targets)}
                for r in self.runs
            },
            "records": tidy.to_dict(orient="records"),
        }

    def figures(
        self,
        out: str | os.PathLike[str] | None = None,
        *,
        band: str | None = None,
        dpi: int = 110,
    ) -> dict[str, Any]:
        """Draw the comparison figures; write them as PNG into ``out`` if given.

        Per target date: true- and false-colour composites (when the bands exist; a grey
        composite for one band), change maps, bias maps and the prediction-vs-truth density;
        plus one loss-curve figure per learned method with a history.

        Returns
        -------
        dict of str to matplotlib.figure.Figure
            Keyed by file stem, e.g. ``composite_true_2004-05-02``.
        """
        from stf_pipeline import plots  # the one lazy import: plots imports matplotlib, needed only here

        figs: dict[str, Any] = {}
        bands = [str(b) for b in self.scores["band"].values]
        composites: list[str | tuple[str, ...]] = [
            k for k, names in plots.COMPOSITES.items() if set(names) <= set(bands)
        ]
        if not composites:
            composites = [tuple(bands[:3]) if len(bands) >= 3 else (bands[0],)]

        def path(stem: str) -> Path | None:
            return Path(out) / f"{stem}.png" if out is not None else None

        for i, date in enumerate(self.targets):
            ran = [r.label for r in self.runs if r.label not in self.skipped.get(date, {})]
            if not ran:
                continue
            truth = self.truth.isel(target=i)
            preds = {label: self.predictions.isel(target=i).sel(run=label) for label in ran}
            for kind in composites:
                name = kind if isinstance(kind, str) else "grey" if len(kind) == 1 else "rgb"
                stem = f"composite_{name}_{date}"
                figs[stem] = plots.plot_composites(truth, preds, bands=kind, date=date, path=path(stem), dpi=dpi)
            ref = self.reference.isel(target=i)
            ref_date = str(self.reference["reference_date"].values[i])
            figs[f"change_{date}"] = plots.plot_change(
                truth, preds, ref, band=band, reference_label=ref_date, path=path(f"change_{date}"), dpi=dpi
            )
            figs[f"bias_{date}"] = plots.plot_bias(
                truth, preds, self.coarse.isel(target=i), band=band, path=path(f"bias_{date}"), dpi=dpi
            )
            figs[f"scatter_{date}"] = plots.plot_scatter(truth, preds, path=path(f"scatter_{date}"), dpi=dpi)
        for label, history in self.histories.items():
            figs[f"loss_{label}"] = plots.plot_losses(
                history, title=f"Training loss of {label}", path=path(f"loss_{label}"), dpi=dpi
            )
        return figs

    def write(self, out: str | os.PathLike[str], *, figures: bool = True) -> dict[str, Path]:
        """Write ``compare.csv`` (Table 2 layout), ``compare.md``, ``compare.json`` and the PNG figures.

        Returns
        -------
        dict of str to pathlib.Path
            Every file written, keyed by stem.
        """
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = {
            "compare.csv": out / "compare.csv",
            "compare.md": out / "compare.md",
            "compare.json": out / "compare.json",
        }
        self.table().to_csv(written["compare.csv"], float_format="%.6g")
        written["compare.md"].write_text(self.to_markdown())
        written["compare.json"].write_text(json.dumps(self.to_json(), indent=1))
        if figures:
            for stem in self.figures(out):
                written[stem] = out / f"{stem}.png"
        return written


def compare(
    cube: xr.Dataset,
    *,
    methods: Sequence[str | MethodRun] | Mapping[str, Mapping[str, Any] | None],
    targets: Sequence[DateLike] | None = None,
    pairs: Sequence[DateLike] | Mapping[str, Sequence[DateLike]] | None = None,
    models: Mapping[str, Any] | None = None,
    out: str | os.PathLike[str] | None = None,
    data_range: float | Mapping[str, float] = 1.0,
    chunks: tuple[int, int] | None = None,
    figures: bool = True,
) -> Comparison:
    """Run ``methods`` on the same fusion tasks of ``cube`` and score them against the truth.

    Parameters
    ----------
    cube : xarray.Dataset
        A cube; scored against ``fine_truth`` when present, else against ``fine`` at the target
        (hidden from the methods).
    methods : sequence of str or MethodRun, or mapping
        Method names, :class:`~stf_pipeline.config.MethodRun` objects (what a pipeline's
        ``methods`` are), or ``{label: {"method": name, **params}}`` to set parameters or run one
        method twice under different labels (``method`` defaults to the label).
    targets : sequence of date-like, optional
        Dates to predict. Default: the cube's ``stf_targets`` attr (catalog cubes), else every
        date with a truth image and a coarse image but no fine observation.
    pairs : sequence of date-like, or mapping target -> sequence, optional
        Pair dates for every target (or per target); default each method's nearest pairs. A
        one-pair method given two pairs uses the one nearest in time to the target.
    models : mapping label -> fitted model, optional
        Trained models of learned methods (``stf.train``); their loss histories are plotted.
    out : path-like, optional
        Directory for ``compare.csv``, ``compare.md``, ``compare.json`` and the PNG figures.
    data_range : float or mapping band -> float, default 1.0
        SSIM data range (see :func:`stf_pipeline.evaluate`).
    chunks : (int, int), optional
        Spatial chunks for the fusions (see :func:`stf_pipeline.fuse`).
    figures : bool, default True
        Write the figures into ``out`` as well.

    Returns
    -------
    Comparison
        ``.scores`` (Dataset), ``.table()`` (DataFrame in the Table 2 layout), ``.to_markdown()``,
        ``.figures()``.

    Raises
    ------
    TaskError
        If no target can be found or a target has no truth; if no method could run at all.
    MethodError, ConfigError
        For unknown methods or parameters.

    Examples
    --------
    >>> result = stf.compare(cube, methods=["delta", "starfm"], out="out/compare")  # doctest: +SKIP
    >>> result.table()  # doctest: +SKIP
    """
    validate_cube(cube)
    runs = method_runs(methods)
    models = dict(models or {})
    unknown_models = sorted(set(models) - {r.label for r in runs})
    if unknown_models:
        raise ConfigError(
            f"models given for {unknown_models}, which are not among the methods {[r.label for r in runs]}."
        )
    truth_var = "fine_truth" if "fine_truth" in cube.data_vars else "fine"
    target_dates = resolve_targets(cube, targets, truth_var)
    factor = cube.attrs.get("coarse_factor")
    ratio = 1.0 / float(factor) if factor else None

    bands = [str(b) for b in cube["band"].values]
    shape = (len(target_dates), len(runs))
    per_band = {m: np.full((*shape, len(bands)), np.nan) for m in PER_BAND}
    per_scene = {m: np.full(shape, np.nan) for m in (*PER_SCENE, "time_s")}
    n_valid = np.zeros(shape, dtype=np.int64)
    template = cube["fine"].isel(time=0, drop=True)
    predictions = np.full((*shape, *template.shape), np.nan, dtype=np.float32)
    truths, coarses, references, reference_dates = [], [], [], []
    used_pairs: dict[str, dict[str, list[str]]] = {}
    skipped: dict[str, dict[str, str]] = {}
    score_attrs: dict[str, Any] = {}

    for i, target in enumerate(target_dates):
        date = iso_date(target)
        truth = cube[truth_var].sel(time=target).compute()
        if not np.isfinite(truth.values).any():
            raise TaskError(f"the truth ({truth_var}) at target {date} is all NaN; choose targets with a truth image.")
        work = _hide_target(cube, target) if truth_var == "fine" else cube
        target_pairs = _pairs_for(pairs, target)
        truths.append(truth.drop_vars([c for c in truth.coords if c not in truth.dims]))
        coarses.append(cube["coarse"].sel(time=target).compute().drop_vars("time"))
        reference_time = None
        tasks: dict[int, Any] = {}
        for j, run in enumerate(runs):
            spec = get_method(run.method)
            try:
                run_pairs = _fit_pairs(target_pairs, target, spec.n_pairs)
                tasks[j] = resolve_task(work, target, pairs=run_pairs, n_pairs=spec.n_pairs)
            except TaskError as err:
                skipped.setdefault(date, {})[run.label] = str(err)
                warnings.warn(f"compare: {run.label} cannot run on {date}: {err}", UserWarning, stacklevel=2)
        inputs = _task_inputs(work, target, tasks.values())
        for j, task in tasks.items():
            run = runs[j]
            start = time.perf_counter()
            pred = fuse(
                inputs, target, method=run.method, pairs=list(task.pairs), model=models.get(run.label),
                chunks=chunks, **dict(run.params),
            ).compute()
            per_scene["time_s"][i, j] = time.perf_counter() - start
            used_pairs.setdefault(date, {})[run.label] = [iso_date(p) for p in task.pairs]
            if reference_time is None:
                before = [p for p in task.pairs if p < target]
                reference_time = before[-1] if before else task.pairs[0]
            scores = evaluate(pred, truth, ratio=ratio, data_range=data_range)
            score_attrs = dict(scores.attrs)
            for m in PER_BAND:
                per_band[m][i, j] = scores[m].sel(band=bands).values
            for m in PER_SCENE:
                per_scene[m][i, j] = float(scores[m])
            n_valid[i, j] = int(scores["n_valid"])
            predictions[i, j] = pred.transpose("band", "y", "x").values
        if reference_time is None:
            reference_time = target
        references.append(cube[truth_var].sel(time=reference_time).compute().drop_vars("time"))
        reference_dates.append(iso_date(reference_time))
    if not used_pairs:
        raise TaskError(
            f"no method could run on any target: {skipped}; pass targets/pairs that the methods accept."
        )

    coords = {"target": np.array(target_dates, dtype="datetime64[ns]"), "run": [r.label for r in runs], "band": bands}
    data_vars: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
        m: (("target", "run", "band"), v) for m, v in per_band.items()
    }
    data_vars.update({m: (("target", "run"), v) for m, v in per_scene.items()})
    data_vars["n_valid"] = (("target", "run"), n_valid)
    scores_ds = xr.Dataset(data_vars, coords=coords)
    scores_ds["time_s"].attrs["long_name"] = "wall-clock seconds of the fusion (build and compute, inputs in memory)"
    scores_ds.attrs.update(score_attrs)
    scores_ds.attrs.setdefault("ergas_ratio", ratio if ratio is not None else float("nan"))
    scores_ds.attrs["higher_is_better"] = json.dumps(HIGHER_IS_BETTER)
    spatial = {k: template[k] for k in ("y", "x") if k in template.coords}
    preds_da = xr.DataArray(
        predictions, dims=("target", "run", "band", "y", "x"), coords={**coords, **spatial}, name="prediction"
    )
    stack = {"target": coords["target"]}
    result = Comparison(
        scores=scores_ds,
        predictions=preds_da,
        truth=xr.concat(truths, dim="target").assign_coords(stack),
        coarse=xr.concat(coarses, dim="target").assign_coords(stack),
        reference=xr.concat(references, dim="target").assign_coords(
            {**stack, "reference_date": ("target", reference_dates)}
        ),
        runs=runs,
        pairs=used_pairs,
        skipped=skipped,
        histories={label: m.history for label, m in models.items() if getattr(m, "history", None)},
    )
    if out is not None:
        result.write(out, figures=figures)
    return result


def _split_best(cell: str) -> list[str]:
    return cell.split(BEST_SEPARATOR) if cell else []


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def resolve_targets(cube: xr.Dataset, targets: Sequence[DateLike] | None, truth_var: str) -> list[np.datetime64]:
    """The target dates to compare on, sorted and unique.

    Parameters
    ----------
    cube : xarray.Dataset
        The cube.
    targets : sequence of date-like, optional
        Dates to predict; by default the cube's ``stf_targets`` attribute, else every date with a
        held-out truth.
    truth_var : str
        The truth's data variable: ``"fine_truth"``, or ``"fine"`` when the cube has no held-out truth.

    Returns
    -------
    list of numpy.datetime64

    Raises
    ------
    TaskError
        When a target is not a date of the cube, or there is no truth to choose default targets from.
    """
    times = cube["time"].values.astype("datetime64[ns]")
    if targets is None and "stf_targets" in cube.attrs:
        targets = list(np.atleast_1d(cube.attrs["stf_targets"]))
    if targets is not None:
        chosen = [to_datetime64(t) for t in ([targets] if isinstance(targets, str) else targets)]
        missing = [iso_date(t) for t in chosen if t not in times]
        if missing:
            raise TaskError(
                f"targets {missing} are not dates of the cube; its dates are {[iso_date(t) for t in times]}."
            )
        if not chosen:
            raise TaskError("targets is empty; give at least one date to predict.")
        return sorted(set(chosen))
    if truth_var != "fine_truth":
        raise TaskError(
            "the cube has no held-out truth (data variable 'fine_truth'), so no default targets; pass "
            "targets=[...] of dates whose fine image is to be predicted (it is hidden from the methods)."
        )
    truth_ok = valid_fraction(cube, "fine_truth") > 0
    held_out = (valid_fraction(cube, "fine") == 0) & (valid_fraction(cube, "coarse") > 0) & truth_ok
    if not held_out.any():
        raise TaskError(
            "no date has a truth image (fine_truth) and a coarse image without a fine observation; "
            "pass targets=[...] explicitly."
        )
    return list(times[held_out])


def _hide_target(cube: xr.Dataset, target: np.datetime64) -> xr.Dataset:
    """The cube with ``fine`` at ``target`` set to NaN (it is the truth there)."""
    keep = xr.DataArray(cube["time"].values != target, dims="time", coords={"time": cube["time"]})
    hidden = cube.assign(fine=cube["fine"].where(keep))
    if "fine_valid" in hidden.coords:
        hidden = hidden.assign_coords(fine_valid=hidden["fine_valid"].where(keep, 0.0))
    return hidden


def _task_inputs(cube: xr.Dataset, target: np.datetime64, tasks: Any) -> xr.Dataset:
    """The dates the tasks read, without the truth, read once (persisted) so that timings are the methods' own."""
    dates = sorted({target, *(p for task in tasks for p in task.pairs)})
    inputs = cube.drop_vars("fine_truth", errors="ignore").sel(time=dates)
    return inputs.persist()


def _pairs_for(
    pairs: Sequence[DateLike] | Mapping[str, Sequence[DateLike]] | None, target: np.datetime64
) -> list[np.datetime64] | None:
    if pairs is None:
        return None
    if isinstance(pairs, Mapping):
        by_date = {to_datetime64(k): v for k, v in pairs.items()}
        if target not in by_date:
            return None
        pairs = by_date[target]
    return [to_datetime64(p) for p in ([pairs] if isinstance(pairs, str) else pairs)]


def _fit_pairs(
    pairs: list[np.datetime64] | None, target: np.datetime64, n_pairs: tuple[int, int]
) -> list[np.datetime64] | None:
    """Keep the ``n_pairs[1]`` pairs nearest to the target (a one-pair method given two)."""
    if pairs is None or len(pairs) <= n_pairs[1]:
        return pairs
    distance = [abs(int((p - target).astype(np.int64))) for p in pairs]
    keep = sorted(np.argsort(distance, kind="stable")[: n_pairs[1]])
    return [pairs[k] for k in keep]


__all__ = ["Comparison", "MethodRun", "compare", "method_runs", "resolve_targets"]
