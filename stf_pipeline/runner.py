"""Running a pipeline: :func:`run` (``stf run``) and :func:`run_compare` (``stf compare``).

A run builds or opens the cube of a :class:`~stf_pipeline.config.PipelineConfig`, optionally writes
it to Zarr, fuses every target date with each listed method (training learned ones first), scores
the predictions against the held-out truth and draws figures. Every step is a library call, so the
same run is one function call from Jupyter: ``stf.run("pipelines/demo.yaml")`` (or ``stf.run("demo")``:
the shipped pipelines are package data). Progress is logged under the ``stf_pipeline`` logger
(:func:`stf_pipeline.log.setup` shows it).

A rerun of the same pipeline continues where the last one stopped: it reuses the written cube
(``cube.zarr`` records which source it was made from) and each complete fused store of the same
request (:func:`stf_pipeline.fuse_series` writes the Zarr regions and resumes,
:mod:`stf_pipeline.store` keeps them safe), and resumes an interrupted one. Outputs that hold
something else are only replaced with ``overwrite=True`` (``stf run --overwrite``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr
from dask.base import tokenize

from stf_pipeline._atomic import remove_directory
from stf_pipeline.catalog import open_catalog
from stf_pipeline.cluster import start_cluster
from stf_pipeline.comparison import Comparison, compare
from stf_pipeline.config import CubeSource, MethodRun, PipelineConfig, load_pipeline
from stf_pipeline.cube import open_cube, write_cube
from stf_pipeline.exceptions import ConfigError, CubeError, StoreError
from stf_pipeline.info import describe_cube
from stf_pipeline.methods import get_method
from stf_pipeline.metrics import evaluate
from stf_pipeline.series import default_model_dir, fuse_series
from stf_pipeline.synthetic import synthetic_scene
from stf_pipeline.task import valid_fraction
from stf_pipeline.training import train

#: attr of ``<output>/cube.zarr``: :func:`dask.base.tokenize` of the cube it was written from
SOURCE_ATTR = "stf_pipeline_source"
#: store in the output folder through which a cluster's workers read a cube that is not written
WORKER_CUBE = ".stf_worker_cube.zarr"

logger = logging.getLogger(__name__)


def build_cube(source: CubeSource, *, root: str | os.PathLike[str] | None = None) -> xr.Dataset:
    """Make the cube of ``source`` (lazily where the source allows); ``root`` replaces a catalog's data root."""
    if source.kind == "synthetic":
        return synthetic_scene(**source.options)
    if source.kind == "catalog":
        cube, _ = open_catalog(source.options["name"], root=root if root is not None else source.options.get("root"))
        return cube
    return open_cube(source.options["path"])


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """What :func:`run` produced: paths of the stores and figures, the scores per method, and
    which outputs an earlier run had already made (``reused``: ``"cube"`` and method names)."""

    config: PipelineConfig
    cube_path: Path | None
    fused: Mapping[str, Path]
    scores: Mapping[str, xr.Dataset]
    figures: tuple[Path, ...]
    reused: tuple[str, ...] = ()

    def summary(self) -> str:
        """Plain text of the outputs: what ``stf run`` prints at the end (stores, trained models, score
        tables, figures)."""
        name = self.config.name
        runs = {run.label: run for run in self.config.methods}
        lines = [f"[{name}] outputs in {self.config.output}"]
        if self.cube_path is not None:
            lines.append(f"  cube: {self.cube_path}{' (reused)' if 'cube' in self.reused else ''}")
        for label, path in self.fused.items():
            lines.append(f"  {label}: {path}{' (reused)' if label in self.reused else ''}")
            model = default_model_dir(Path(path))
            if get_method(runs[label].method).learned and model.is_dir():
                lines.append(f"  {label} model: {model} (loss curves: {model / 'loss_curves.png'})")
        for label, scores in self.scores.items():
            lines.append(_score_table(label, scores))
        lines += [f"  figure: {path}" for path in self.figures]
        return "\n".join(lines)


def train_options(run_: MethodRun, cube: xr.Dataset) -> dict[str, Any]:
    """The :func:`stf_pipeline.train` options of a learned method's run on ``cube``: its ``train``
    options, with ``train_times`` defaulting to the cube's ``stf_train_times`` attr (catalog
    splits) or to every date with fine data."""
    options = dict(run_.train or {})
    if "train_times" not in options:
        listed = list(cube.attrs.get("stf_train_times") or [])
        options["train_times"] = listed or [
            str(np.datetime_as_string(t, unit="D"))
            for t, f in zip(cube["time"].values, valid_fraction(cube, "fine"), strict=True)
            if f > 0
        ]
    return options


def _score_table(name: str, scores: xr.Dataset) -> str:
    lines = [
        f"scores of {name} (mean over bands for rmse/cc/ssim):",
        f"  {'date':<10}  {'rmse':>8}  {'cc':>6}  {'ssim':>6}  {'ergas':>7}  {'sam':>7}",
    ]
    for t in scores["time"].values:
        s = scores.sel(time=t)
        lines.append(
            f"  {np.datetime_as_string(t, unit='D'):<10}  {float(s.rmse.mean()):8.4f}  {float(s.cc.mean()):6.3f}  "
            f"{float(s.ssim.mean()):6.3f}  {float(s.ergas):7.3f}  {float(s.sam):7.3f}"
        )
    return "\n".join(lines)


def _scores_to_json(scores: xr.Dataset, path: Path) -> None:
    out = {}
    for t in scores["time"].values:
        s = scores.sel(time=t)
        out[str(np.datetime_as_string(t, unit="D"))] = {
            name: (
                {str(b): float(v) for b, v in zip(s["band"].values, s[name].values, strict=True)}
                if "band" in s[name].dims
                else float(s[name])
            )
            for name in s.data_vars
        }
    path.write_text(json.dumps(out, indent=2))


@contextlib.contextmanager
def _scheduler(config: PipelineConfig) -> Iterator[None]:
    """Run inside ``stf_pipeline.cluster.start_cluster(config.cluster)`` when the pipeline has a
    ``cluster`` block (``{}``: a local cluster sized to the machine); else on Dask's threads."""
    if config.cluster is None:
        yield
        return
    with start_cluster(dict(config.cluster)):
        yield


@contextlib.contextmanager
def _worker_cube_removed(config: PipelineConfig) -> Iterator[None]:
    """Remove the cube store made for a cluster's workers (:func:`_through_zarr`) at the end."""
    try:
        yield
    finally:
        if (config.output / WORKER_CUBE).exists():
            remove_directory(config.output / WORKER_CUBE)


def _with_truth(cube: xr.Dataset, dates: np.ndarray) -> np.ndarray:
    """The ``dates`` at which ``fine_truth`` holds data (a catalog's held-out dates; all for synthetic cubes)."""
    if "fine_truth" not in cube.data_vars or dates.size == 0:
        return dates[:0]
    present = cube["fine_truth"].sel(time=dates).notnull().any(("band", "y", "x")).values
    return dates[present]


def _composite(bands: Sequence[str]) -> str | tuple[str, ...]:
    """True colour if the cube has red, green and blue; else false colour; else the first 3 (or 1) bands."""
    if {"red", "green", "blue"} <= set(bands):
        return "true"
    if {"nir", "red", "green"} <= set(bands):
        return "false"
    return tuple(bands[:3]) if len(bands) >= 3 else (bands[0],)


def _figures(
    cube: xr.Dataset,
    fused: Mapping[str, xr.Dataset],
    scores: Mapping[str, xr.Dataset],
    config: PipelineConfig,
) -> list[Path]:
    """Composites and scatter plots of every method at one target date with truth: the hardest
    one (highest mean RMSE of the first method) when scores exist, else the first; none without truth."""
    from stf_pipeline import plots  # the one lazy import: plots imports matplotlib, needed only here

    first = next(iter(fused.values()))
    targets = _with_truth(cube, first["time"].values[first["source"].values == "fused"])
    if not targets.size:
        return []
    if scores:
        rmse = next(iter(scores.values()))["rmse"].mean("band")
        date = rmse["time"].values[int(np.nanargmax(rmse.values))]
    else:
        date = targets[0]
    iso = str(np.datetime_as_string(date, unit="D"))
    truth = cube["fine_truth"].sel(time=date).load()
    preds = {name: ds["fine"].sel(time=date).load() for name, ds in fused.items()}
    bands = [str(b) for b in truth["band"].values]
    paths = [config.output / f"composites_{iso}.png", config.output / f"scatter_{iso}.png"]
    plots.plot_composites(truth, preds, bands=_composite(bands), title=config.name, date=iso, path=paths[0])
    plots.plot_scatter(truth, preds, path=paths[1])
    return paths


def _prepare_cube(config: PipelineConfig, *, overwrite: bool) -> tuple[xr.Dataset, Path | None, bool]:
    """Build the cube; write it to ``<output>/cube.zarr`` and reopen it from there if asked.

    A ``cube.zarr`` written from the same cube (same :func:`dask.base.tokenize` of the lazy
    source: the synthetic arguments, the catalog's files, the input store) is reused, with or
    without ``overwrite``; one written from another is replaced only with ``overwrite``. Returns
    the cube, its path and whether it was reused.
    """
    logger.info("[%s] cube from %s %s", config.name, config.cube.kind, dict(config.cube.options))
    cube = build_cube(config.cube)
    if not config.write_cube:
        if config.cluster is not None and config.cube.kind != "zarr":
            cube = _through_zarr(cube, config.output / WORKER_CUBE)
        logger.info("%s", describe_cube(cube))
        return cube, None, False
    path = config.output / "cube.zarr"
    if config.cube.kind == "zarr" and Path(config.cube.options["path"]).resolve() == path.resolve():
        logger.info("[%s] the cube is already %s; not writing it over itself", config.name, path)
        logger.info("%s", describe_cube(cube))
        return cube, path, True
    digest = tokenize(cube)
    if path.exists():
        try:
            written = open_cube(path)
        except CubeError:
            written = None
        if written is not None and written.attrs.get(SOURCE_ATTR) == digest:
            logger.info("[%s] reusing %s (written from this cube by an earlier run)", config.name, path)
            logger.info("%s", describe_cube(written))
            return written, path, True
        if not overwrite:
            what = "a damaged cube store" if written is None else "a cube written from another source"
            raise StoreError(
                f"{path} holds {what}; pass overwrite=True to replace it, or pass output= another folder."
            )
    write_cube(cube.assign_attrs({SOURCE_ATTR: digest}), path, overwrite=overwrite)
    logger.info("[%s] wrote %s", config.name, path)
    cube = open_cube(path)
    logger.info("%s", describe_cube(cube))
    return cube, path, False


def _through_zarr(cube: xr.Dataset, path: Path) -> xr.Dataset:
    """The cube written to ``path`` and opened from there, so that workers read it from disk.

    A catalog cube holds its images in memory, inside the Dask graph: on a cluster every graph
    that reads them would carry them to the scheduler (``Sending large graph of size 11 MiB``,
    ``Detected different run_spec``). From Zarr a graph task names a chunk of a store instead.
    The folder is the run's output folder, which the workers write to anyway; :func:`run`
    removes the store at the end.
    """
    logger.info("[cluster] the cube goes to the workers through %s (removed at the end of the run)", path)
    return open_cube(write_cube(cube, path, overwrite=True))


def _fuse_method(
    config: PipelineConfig, run_: MethodRun, cube: xr.Dataset, *, overwrite: bool
) -> tuple[xr.Dataset, Path, bool]:
    """Fuse the targets with one method into ``<output>/fused_<method>.zarr``; whether an
    earlier run's complete store of the same request was reused."""
    spec = get_method(run_.method)
    out = config.output / f"fused_{run_.label}.zarr"
    fused = fuse_series(  # it logs whether it fuses, resumes or reuses the store
        cube,
        method=run_.method,
        out=out,
        targets=config.targets,
        overwrite=overwrite,
        chunks=config.chunks,
        train_options=train_options(run_, cube) if spec.learned else None,
        **run_.params,
    )
    reused = fused.encoding.get("stf_action") == "reused"
    return fused, out, reused


def _score(config: PipelineConfig, name: str, cube: xr.Dataset, fused: xr.Dataset) -> xr.Dataset | None:
    """Scores of the fused dates that have held-out truth, written to ``scores_<name>.json``."""
    targets = _with_truth(cube, fused["time"].values[fused["source"].values == "fused"])
    if not targets.size:
        logger.info("[%s] no held-out truth (fine_truth) at the fused dates of %s: no scores.", config.name, name)
        return None
    factor = cube.attrs.get("coarse_factor")
    scores = evaluate(
        fused["fine"].sel(time=targets), cube["fine_truth"].sel(time=targets), ratio=1.0 / factor if factor else None
    )
    path = config.output / f"scores_{name}.json"
    _scores_to_json(scores, path)
    logger.info(
        "[%s] %s: mean RMSE %.4f, SSIM %.3f over %d date(s) -> %s",
        config.name, name, float(scores["rmse"].mean()), float(scores["ssim"].mean()), targets.size, path,
    )
    return scores


def _configured(
    path_or_config: str | os.PathLike[str] | PipelineConfig, overrides: Mapping[str, Any]
) -> PipelineConfig:
    config = path_or_config if isinstance(path_or_config, PipelineConfig) else load_pipeline(path_or_config)
    return config.with_overrides(**overrides)


def run(
    path_or_config: str | os.PathLike[str] | PipelineConfig,
    *,
    output: str | os.PathLike[str] | None = None,
    methods: Sequence[str] | None = None,
    targets: Sequence[Any] | None = None,
    root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> PipelineResult:
    """Run a pipeline: what ``stf run PIPELINE.yaml`` calls.

    Steps: build the cube (synthetic, catalog or Zarr); write it to ``<output>/cube.zarr`` and
    describe it; for each method, fuse every target into ``<output>/fused_<method>.zarr``
    (:func:`stf_pipeline.fuse_series`, which trains a learned method first with the ``train``
    options; ``train_times`` default to the catalog's training dates or every fine date); score
    the fused dates against ``fine_truth`` (``<output>/scores_<method>.json``); draw composites and
    scatter plots of all methods at the hardest target date. Progress is logged (INFO) under
    ``stf_pipeline``; :meth:`PipelineResult.summary` is the text ``stf run`` prints at the end.

    Running it again continues: the cube and complete fused stores of the same request are
    reused (``PipelineResult.reused``), an interrupted store is resumed.

    Parameters
    ----------
    path_or_config : path-like, str or PipelineConfig
        A pipeline YAML file, the name of a shipped pipeline (``"demo"``) or a loaded config.
    output, methods, targets, root
        Replace the pipeline's output folder, methods, targets or catalog data root
        (:meth:`PipelineConfig.with_overrides`; ``stf run --out/--methods/--targets/--root``).
    overwrite : bool, default False
        Replace outputs that hold something else (another cube, another request); without it
        such an output is an error and nothing is replaced.

    Returns
    -------
    PipelineResult

    Raises
    ------
    ConfigError
        A malformed pipeline or method parameters (before any work starts).
    StoreError
        An output holds something else and ``overwrite`` is False.
    STFError
        From the steps (catalog, cube, task, method, store errors).

    Examples
    --------
    >>> result = stf.run("pipelines/demo.yaml")  # doctest: +SKIP
    >>> result.scores["delta"].rmse.mean().item()  # doctest: +SKIP
    """
    config = _configured(path_or_config, {"output": output, "methods": methods, "targets": targets, "root": root})
    config.check()
    config.output.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    # the cube is made on this process's threads, before a cluster starts: a catalog's images are
    # read here and reach the workers through a Zarr store, not inside task graphs
    with _worker_cube_removed(config):
        cube, cube_path, cube_reused = _prepare_cube(config, overwrite=overwrite)
        if cube_reused:
            reused.append("cube")
        with _scheduler(config):
            fused_paths, all_scores, figures = _fuse_all(config, cube, overwrite=overwrite, reused=reused)
    return PipelineResult(
        config=config,
        cube_path=cube_path,
        fused=MappingProxyType(fused_paths),
        scores=MappingProxyType(all_scores),
        figures=tuple(figures),
        reused=tuple(reused),
    )


def _fuse_all(
    config: PipelineConfig, cube: xr.Dataset, *, overwrite: bool, reused: list[str]
) -> tuple[dict[str, Path], dict[str, xr.Dataset], list[Path]]:
    """Fuse, score and draw every method of :func:`run`: the fused stores, the scores and the
    figures; appends the methods whose store was reused to ``reused``."""
    fused_paths: dict[str, Path] = {}
    fused_sets: dict[str, xr.Dataset] = {}
    all_scores: dict[str, xr.Dataset] = {}
    for run_ in config.methods:
        fused, out, was_reused = _fuse_method(config, run_, cube, overwrite=overwrite)
        fused_paths[run_.label] = out
        fused_sets[run_.label] = fused
        if was_reused:
            reused.append(run_.label)
        scores = _score(config, run_.label, cube, fused) if config.evaluate else None
        if scores is not None:
            all_scores[run_.label] = scores
    figures: list[Path] = []
    if config.figures and fused_sets:
        figures = _figures(cube, fused_sets, all_scores, config)
        for path in figures:
            logger.info("[%s] figure %s", config.name, path)
    return fused_paths, all_scores, figures


def run_compare(
    path_or_config: str | os.PathLike[str] | PipelineConfig,
    *,
    out: str | os.PathLike[str] | None = None,
    figures: bool = True,
    methods: Sequence[str] | None = None,
    targets: Sequence[Any] | None = None,
    root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Comparison:
    """Compare a pipeline's methods on the same targets: what ``stf compare PIPELINE.yaml`` calls.

    Builds (and writes) the cube as :func:`run` does, trains the learned methods
    (``<output>/train_<method>``), then calls :func:`stf_pipeline.compare` with every method.

    Parameters
    ----------
    path_or_config : path-like, str or PipelineConfig
    out : path-like, optional
        Output directory for the table and figures; default the pipeline's ``output``.
    figures : bool, default True
    methods, targets, root
        As for :func:`run`.
    overwrite : bool, default False
        Replace a ``cube.zarr`` written from another cube.

    Returns
    -------
    stf_pipeline.comparison.Comparison
    """
    config = _configured(path_or_config, {"output": out, "methods": methods, "targets": targets, "root": root})
    config.check()
    if not config.methods:
        raise ConfigError(f"pipeline {config.name}: 'methods' is empty; list the methods to compare.")
    config.output.mkdir(parents=True, exist_ok=True)
    with _worker_cube_removed(config):
        cube, _, _ = _prepare_cube(config, overwrite=overwrite)  # before a cluster starts, as in run()
        with _scheduler(config):
            return _compare_all(config, cube, figures=figures)


def _compare_all(config: PipelineConfig, cube: xr.Dataset, *, figures: bool) -> Comparison:
    """Train the learned methods and run :func:`stf_pipeline.compare` for :func:`run_compare`."""
    models = {}
    for run_ in config.methods:
        if get_method(run_.method).learned:
            logger.info("[%s] training %s", config.name, run_.label)
            models[run_.label] = train(
                cube, method=run_.method, workdir=config.output / f"train_{run_.label}", **train_options(run_, cube)
            )
    return compare(
        cube,
        methods=config.methods,
        targets=list(config.targets) if config.targets else None,  # default: the catalog's targets
        models=models,
        out=config.output,
        chunks=config.chunks,
        figures=figures,
    )
