"""Pipelines: a YAML file in ``pipelines/`` -> a frozen config -> one :func:`run` call.

A pipeline builds or opens a cube, optionally writes it to Zarr, fuses every target date with
each listed method (training learned ones first), scores the predictions against the held-out
truth and draws figures. Every step is a library call, so the same run is one function call
from Jupyter: ``stf.run("pipelines/demo.yaml")`` (or ``stf.run("demo")``: the shipped pipelines
are package data). Progress is logged under the ``stf_pipeline`` logger
(:func:`stf_pipeline.log.setup` shows it).

A rerun of the same pipeline continues where the last one stopped: it reuses the written cube
(``cube.zarr`` records which source it was made from) and each complete fused store of the same
request, and resumes an interrupted one. Outputs that hold something else are only replaced with
``overwrite=True`` (``stf run --overwrite``).

The file's ``name`` is a plain name and its ``output`` a relative path without ``..``, so a
pipeline file cannot write outside the folder it is run from; an output folder elsewhere is
given by the user (``output=`` / ``stf run --out DIR``).

Schema (unknown keys are errors; ``extends: other.yaml`` merges this file over another)::

    name: demo
    cube:                         # exactly one of:
      synthetic: {height: 480, width: 480, n_times: 10, seed: 0}   # stf.synthetic_scene kwargs
      # catalog: zhu_estarfm      # or {name: cia, root: /data/stf}: stf.open_catalog
      # zarr: scene.zarr          # stf.open_cube
    output: out/demo              # default out/<name>; relative, without '..'
    write_cube: true              # write the cube to <output>/cube.zarr and continue from it
    methods:
      - name: delta
        params: {window: 5}
        train: null               # learned methods: stf.train options (train_times, config, ...)
    targets: null                 # default: every coarse-only date
    chunks: null                  # [y, x] spatial chunk for fusion
    evaluate: true
    figures: true
    cluster: null                 # null: Dask threads; {} a local cluster sized to the machine;
                                  # {address: tcp://...} or {gpu: true}: see stf_pipeline.cluster
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import xarray as xr

from stf_pipeline._schema import checked_keys
from stf_pipeline.exceptions import ConfigError, MethodError

CUBE_KINDS: tuple[str, ...] = ("synthetic", "catalog", "zarr")
#: the package's folder of shipped pipelines (a link to the clone's top-level ``pipelines/``)
PIPELINE_DIR = Path(str(importlib.resources.files("stf_pipeline") / "pipelines"))
#: attr of ``<output>/cube.zarr``: :func:`dask.base.tokenize` of the cube it was written from
SOURCE_ATTR = "stf_pipeline_source"
#: store in the output folder through which a cluster's workers read a cube that is not written
WORKER_CUBE = ".stf_worker_cube.zarr"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

logger = logging.getLogger(__name__)


def _keys(mapping: Any, allowed: Sequence[str], where: str, required: Sequence[str] = ()) -> dict[str, Any]:
    return checked_keys(mapping, allowed, where, required=required, error=ConfigError)


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class CubeSource:
    """Where a pipeline's cube comes from: ``kind`` is synthetic, catalog or zarr."""

    kind: str
    options: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, spec: Any) -> CubeSource:
        spec = _keys(spec, CUBE_KINDS, "cube")
        if len(spec) != 1:
            raise ConfigError(f"cube must have exactly one of {list(CUBE_KINDS)}, got {sorted(spec) or 'none'}.")
        ((kind, value),) = spec.items()
        if kind == "synthetic":
            options = _keys(value or {}, _synthetic_keys(), "cube.synthetic")
        elif kind == "catalog":
            options = (
                {"name": value} if isinstance(value, str) else _keys(value, ("name", "root"), "cube.catalog", ("name",))
            )
        else:
            options = {"path": value} if isinstance(value, str) else _keys(value, ("path",), "cube.zarr", ("path",))
        return cls(kind=kind, options=_freeze(options))

    def build(self, *, root: str | os.PathLike[str] | None = None) -> xr.Dataset:
        """Make the cube (lazily where the source allows); ``root`` replaces a catalog's data root."""
        import stf_pipeline as stf

        if self.kind == "synthetic":
            return stf.synthetic_scene(**self.options)
        if self.kind == "catalog":
            cube, _ = stf.open_catalog(
                self.options["name"], root=root if root is not None else self.options.get("root")
            )
            return cube
        return stf.open_cube(self.options["path"])


def _synthetic_keys() -> tuple[str, ...]:
    import inspect

    from stf_pipeline.synthetic import synthetic_scene

    return tuple(inspect.signature(synthetic_scene).parameters)


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One method of a pipeline: registry ``name``, its ``params`` and, for learned methods,
    the ``train`` options of :func:`stf_pipeline.train` (``None``: defaults)."""

    name: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(cls, spec: Any, where: str) -> MethodRun:
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = _keys(spec, ("name", "params", "train"), where, ("name",))
        from stf_pipeline.methods import available_methods

        name = str(spec["name"]).lower()
        if name not in available_methods():
            raise ConfigError(f"{where}: unknown method {spec['name']!r}; choose one of {available_methods()}.")
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.params must be a mapping of the method's parameters, got {params!r}.")
        train = spec.get("train")
        if train is not None and not isinstance(train, Mapping):
            raise ConfigError(f"{where}.train must be a mapping of stf.train options or null, got {train!r}.")
        return cls(name=name, params=_freeze(params), train=None if train is None else _freeze(train))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """A validated pipeline (see the module docstring for the YAML schema)."""

    name: str
    cube: CubeSource
    methods: tuple[MethodRun, ...]
    output: Path
    write_cube: bool = True
    targets: tuple[str, ...] | None = None
    chunks: tuple[int, int] | None = None
    evaluate: bool = True
    figures: bool = True
    cluster: Mapping[str, Any] | None = None

    @classmethod
    def from_mapping(cls, spec: Any, *, source: str = "<mapping>") -> PipelineConfig:
        fields = tuple(f.name for f in dataclasses.fields(cls))
        spec = _keys(spec, fields, f"pipeline {source}", ("cube",))
        name = str(spec.get("name", Path(source).stem if source != "<mapping>" else "pipeline"))
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"pipeline {source}: name {name!r} must be a plain name (letters, digits, '.', '_', '-'; no path), "
                "e.g. name: my-run; it names the default output folder out/<name>."
            )
        output = Path(spec.get("output") or Path("out") / name)
        if output.is_absolute() or ".." in output.parts:
            raise ConfigError(
                f"pipeline {source}: output {str(output)!r} must be a relative path without '..' (it is written "
                "below the folder the pipeline is run from); to write elsewhere, pass it yourself: "
                "stf run PIPELINE --out DIR, or stf.run(path, output=DIR)."
            )
        methods = spec.get("methods") or []
        if not isinstance(methods, list):
            raise ConfigError(f"pipeline {source}: methods must be a list, got {methods!r}.")
        for key in ("write_cube", "evaluate", "figures"):
            if key in spec and not isinstance(spec[key], bool):
                raise ConfigError(f"pipeline {source}: {key} must be true or false, got {spec[key]!r}.")
        targets = spec.get("targets")
        if targets is not None:
            if not isinstance(targets, list) or not targets:
                raise ConfigError(
                    f"pipeline {source}: targets must be a non-empty list of dates or null, got {targets!r}."
                )
            try:
                targets = tuple(str(np.datetime64(str(t), "D")) for t in targets)
            except ValueError:
                raise ConfigError(
                    f"pipeline {source}: targets {targets!r} must be ISO dates such as 2004-05-02."
                ) from None
        chunks = spec.get("chunks")
        if chunks is not None:
            if not (
                isinstance(chunks, list) and len(chunks) == 2 and all(isinstance(c, int) and c > 0 for c in chunks)
            ):
                raise ConfigError(
                    f"pipeline {source}: chunks must be [y, x] positive integers or null, got {chunks!r}."
                )
            chunks = (chunks[0], chunks[1])
        cluster = spec.get("cluster")
        if cluster is not None:
            if not isinstance(cluster, Mapping):
                raise ConfigError(f"pipeline {source}: cluster must be a mapping or null, got {cluster!r}.")
            from stf_pipeline.cluster import ClusterConfig

            ClusterConfig.from_mapping(cluster)  # fail early, naming a bad key
        return cls(
            name=name,
            cube=CubeSource.from_mapping(spec["cube"]),
            methods=tuple(MethodRun.from_mapping(m, f"pipeline {source}: methods[{i}]") for i, m in enumerate(methods)),
            output=output,
            write_cube=spec.get("write_cube", True),
            targets=targets,
            chunks=chunks,
            evaluate=spec.get("evaluate", True),
            figures=spec.get("figures", True),
            cluster=None if cluster is None else _freeze(cluster),
        )


    def with_overrides(
        self,
        *,
        output: str | os.PathLike[str] | None = None,
        methods: Sequence[str] | None = None,
        targets: Sequence[Any] | None = None,
        root: str | os.PathLike[str] | None = None,
    ) -> PipelineConfig:
        """This config with the user's choices of ``stf run --out/--methods/--targets/--root``.

        Parameters
        ----------
        output : path-like, optional
            Output folder (any path: the user gives it).
        methods : sequence of str, optional
            Run only these methods: names of the pipeline's methods (with their params and
            training options) or of any registered method (with its defaults), in this order.
        targets : sequence of date-like, optional
            Fuse (and score) these dates instead of the pipeline's targets.
        root : path-like, optional
            Data root of a catalog cube (``stf.open_catalog(..., root=)``).

        Raises
        ------
        ConfigError
            An unknown method, a date that is not ISO, or ``root`` for a cube that is not a catalog.
        """
        changes: dict[str, Any] = {}
        if output is not None:
            changes["output"] = Path(output)
        if methods is not None:
            from stf_pipeline.methods import available_methods

            listed = {m.name: m for m in self.methods}
            unknown = [m for m in methods if m.lower() not in listed and m.lower() not in available_methods()]
            if unknown or not methods:
                raise ConfigError(
                    f"pipeline {self.name}: unknown method(s) {unknown or methods}; choose among the pipeline's "
                    f"{list(listed)} or any of {available_methods()}."
                )
            changes["methods"] = tuple(listed.get(m.lower(), MethodRun(name=m.lower())) for m in methods)
        if targets is not None:
            try:
                changes["targets"] = tuple(str(np.datetime64(str(t), "D")) for t in targets)
            except ValueError:
                raise ConfigError(f"targets {list(targets)} must be ISO dates such as 2004-05-02.") from None
            if not changes["targets"]:
                raise ConfigError("targets is empty; give at least one date such as 2004-05-02.")
        if root is not None:
            if self.cube.kind != "catalog":
                raise ConfigError(
                    f"pipeline {self.name}: a data root is only for a catalog cube; this one is {self.cube.kind}."
                )
            changes["cube"] = CubeSource(kind="catalog", options=_freeze({**self.cube.options, "root": str(root)}))
        return dataclasses.replace(self, **changes)


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into ``base``: mappings merge, other values replace, ``null`` removes."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_spec(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a pipeline file, with its ``extends:`` base file (relative to it) merged under it."""
    import yaml

    if not path.is_file():
        raise ConfigError(
            f"pipeline file {path} does not exist; pass a YAML file or the name of a shipped pipeline "
            f"({', '.join(pipeline_names())})."
        )
    if path.resolve() in chain:
        raise ConfigError(f"pipeline {path} extends itself through {[str(p) for p in chain]}; break the cycle.")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"pipeline {path} is not valid YAML: {err}") from None
    if not isinstance(spec, Mapping):
        raise ConfigError(f"pipeline {path} must be a mapping of pipeline keys, got {type(spec).__name__}.")
    spec = dict(spec)
    base = spec.pop("extends", None)
    if base is None:
        return spec
    return _merge(_read_spec(path.parent / str(base), (*chain, path.resolve())), spec)


def pipeline_names() -> list[str]:
    """Names of the shipped pipelines (``stf run NAME``)."""
    return sorted(p.stem for p in PIPELINE_DIR.glob("*.yaml"))


def pipeline_path(path_or_name: str | os.PathLike[str]) -> Path:
    """The file of a pipeline: ``path_or_name`` itself when it exists, else the shipped pipeline
    of that name (``demo``, ``demo.yaml``, ``pipelines/demo.yaml`` outside a clone)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    shipped = PIPELINE_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent in (Path("."), Path("pipelines")) and shipped.is_file():
        return shipped
    return path


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    """Load and validate a pipeline YAML file (or a shipped pipeline by name, see :func:`pipeline_path`).

    A variant names a base file with ``extends: base.yaml`` (relative to the variant) and gives
    only what differs: mappings merge key by key, other values replace, ``null`` removes a key
    (``cube: {synthetic: null, catalog: cia}`` switches the cube source).

    Raises
    ------
    ConfigError
        Missing file, invalid YAML, or a schema violation (naming the key and the valid ones).
    """
    path = pipeline_path(path)
    return PipelineConfig.from_mapping(_read_spec(path), source=str(path))


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
        from stf_pipeline.methods import get_method
        from stf_pipeline.series import default_model_dir

        name = self.config.name
        lines = [f"[{name}] outputs in {self.config.output}"]
        if self.cube_path is not None:
            lines.append(f"  cube: {self.cube_path}{' (reused)' if 'cube' in self.reused else ''}")
        for method, path in self.fused.items():
            lines.append(f"  {method}: {path}{' (reused)' if method in self.reused else ''}")
            model = default_model_dir(Path(path))
            if get_method(method).learned and model.is_dir():
                lines.append(f"  {method} model: {model} (loss curves: {model / 'loss_curves.png'})")
        for method, scores in self.scores.items():
            lines.append(_score_table(method, scores))
        lines += [f"  figure: {path}" for path in self.figures]
        return "\n".join(lines)


def _check_methods(config: PipelineConfig) -> None:
    """Validate every method's parameters before any work starts."""
    from stf_pipeline.methods import get_method

    for run_ in config.methods:
        spec = get_method(run_.name)
        try:
            params = dict(run_.params)
            spec.resolve_backend(str(params.pop("backend", "auto")))  # an argument of stf.fuse, not a parameter
            spec.make_params(**params)
        except (TypeError, MethodError) as err:
            raise ConfigError(
                f"pipeline {config.name}: method {run_.name!r} params {dict(run_.params)}: {err}"
            ) from None
        if run_.train is not None and not spec.learned:
            raise ConfigError(f"pipeline {config.name}: method {run_.name!r} is not learned; remove its 'train' entry.")


def _train_options(run_: MethodRun, cube: xr.Dataset) -> dict[str, Any]:
    """``stf.train`` options; ``train_times`` default to the cube's ``stf_train_times`` attr
    (catalog splits) or to every date with fine data."""
    from stf_pipeline.task import valid_fraction

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
    from stf_pipeline.cluster import start_cluster

    with start_cluster(dict(config.cluster)):
        yield


@contextlib.contextmanager
def _worker_cube_removed(config: PipelineConfig) -> Iterator[None]:
    """Remove the cube store made for a cluster's workers (:func:`_through_zarr`) at the end."""
    from stf_pipeline._atomic import remove_directory

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
    plots: Any,
    cube: xr.Dataset,
    fused: Mapping[str, xr.Dataset],
    scores: Mapping[str, xr.Dataset],
    config: PipelineConfig,
) -> list[Path]:
    """Composites and scatter plots of every method at one target date with truth: the hardest
    one (highest mean RMSE of the first method) when scores exist, else the first; none without truth."""
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


def _prepare(config: PipelineConfig, *, overwrite: bool) -> tuple[xr.Dataset, Path | None, bool]:
    """Build the cube; write it to ``<output>/cube.zarr`` and reopen it from there if asked.

    A ``cube.zarr`` written from the same cube (same :func:`dask.base.tokenize` of the lazy
    source: the synthetic arguments, the catalog's files, the input store) is reused, with or
    without ``overwrite``; one written from another is replaced only with ``overwrite``. Returns
    the cube, its path and whether it was reused.
    """
    from dask.base import tokenize

    import stf_pipeline as stf
    from stf_pipeline.exceptions import CubeError, StoreError
    from stf_pipeline.info import describe_cube

    logger.info("[%s] cube from %s %s", config.name, config.cube.kind, dict(config.cube.options))
    cube = config.cube.build()
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
            written = stf.open_cube(path)
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
    stf.write_cube(cube.assign_attrs({SOURCE_ATTR: digest}), path, overwrite=overwrite)
    logger.info("[%s] wrote %s", config.name, path)
    cube = stf.open_cube(path)
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
    import stf_pipeline as stf

    logger.info("[cluster] the cube goes to the workers through %s (removed at the end of the run)", path)
    return stf.open_cube(stf.write_cube(cube, path, overwrite=True))


def _fuse_method(
    config: PipelineConfig, run_: MethodRun, cube: xr.Dataset, *, overwrite: bool
) -> tuple[xr.Dataset, Path, bool]:
    """Fuse the targets with one method into ``<output>/fused_<method>.zarr``; whether an
    earlier run's complete store of the same request was reused."""
    import stf_pipeline as stf

    spec = stf.get_method(run_.name)
    out = config.output / f"fused_{run_.name}.zarr"
    fused = stf.fuse_series(  # it logs whether it fuses, resumes or reuses the store
        cube,
        method=run_.name,
        out=out,
        targets=config.targets,
        overwrite=overwrite,
        chunks=config.chunks,
        train_options=_train_options(run_, cube) if spec.learned else None,
        **run_.params,
    )
    reused = fused.encoding.get("stf_action") == "reused"
    return fused, out, reused


def _score(config: PipelineConfig, name: str, cube: xr.Dataset, fused: xr.Dataset) -> xr.Dataset | None:
    """Scores of the fused dates that have held-out truth, written to ``scores_<name>.json``."""
    import stf_pipeline as stf

    targets = _with_truth(cube, fused["time"].values[fused["source"].values == "fused"])
    if not targets.size:
        logger.info("[%s] no held-out truth (fine_truth) at the fused dates of %s: no scores.", config.name, name)
        return None
    factor = cube.attrs.get("coarse_factor")
    scores = stf.evaluate(
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
    _check_methods(config)
    config.output.mkdir(parents=True, exist_ok=True)
    reused: list[str] = []
    # the cube is made on this process's threads, before a cluster starts: a catalog's images are
    # read here and reach the workers through a Zarr store, not inside task graphs
    with _worker_cube_removed(config):
        cube, cube_path, cube_reused = _prepare(config, overwrite=overwrite)
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
    from stf_pipeline import plots

    fused_paths: dict[str, Path] = {}
    fused_sets: dict[str, xr.Dataset] = {}
    all_scores: dict[str, xr.Dataset] = {}
    for run_ in config.methods:
        fused, out, was_reused = _fuse_method(config, run_, cube, overwrite=overwrite)
        fused_paths[run_.name] = out
        fused_sets[run_.name] = fused
        if was_reused:
            reused.append(run_.name)
        scores = _score(config, run_.name, cube, fused) if config.evaluate else None
        if scores is not None:
            all_scores[run_.name] = scores
    figures: list[Path] = []
    if config.figures and fused_sets:
        figures = _figures(plots, cube, fused_sets, all_scores, config)
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
) -> Any:
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
    stf_pipeline.compare.Comparison
    """
    config = _configured(path_or_config, {"output": out, "methods": methods, "targets": targets, "root": root})
    _check_methods(config)
    if not config.methods:
        raise ConfigError(f"pipeline {config.name}: 'methods' is empty; list the methods to compare.")
    config.output.mkdir(parents=True, exist_ok=True)
    with _worker_cube_removed(config):
        cube, _, _ = _prepare(config, overwrite=overwrite)  # before a cluster starts, as in run()
        with _scheduler(config):
            return _compare_all(config, cube, figures=figures)


def _compare_all(config: PipelineConfig, cube: xr.Dataset, *, figures: bool) -> Any:
    """Train the learned methods and run :func:`stf_pipeline.compare` for :func:`run_compare`."""
    import stf_pipeline as stf

    models = {}
    for run_ in config.methods:
        if stf.get_method(run_.name).learned:
            logger.info("[%s] training %s", config.name, run_.name)
            models[run_.name] = stf.train(
                cube, method=run_.name, workdir=config.output / f"train_{run_.name}", **_train_options(run_, cube)
            )
    return stf.compare(
        cube,
        methods={run_.name: dict(run_.params) for run_ in config.methods},
        targets=list(config.targets) if config.targets else None,  # default: the catalog's targets
        models=models,
        out=config.output,
        chunks=config.chunks,
        figures=figures,
    )
