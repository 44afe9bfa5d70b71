"""Catalogs: one YAML file per data set (``catalogs/*.yaml``) -> a cube and its fusion task.

A catalog names the files of a data set (explicitly by date, or by a glob with a date pattern),
how to read each sensor (:class:`stf_pipeline.ingest.Sensor` fields, or a preset name), the cube
bands, ``coarse_factor``, and the task: the target date, its pair dates, and optionally more
evaluation ``targets`` and ``train`` dates for learned methods. The shipped catalogs are package
data (``stf_pipeline/catalogs``, a link to the clone's top-level ``catalogs/``), read with
:mod:`importlib.resources`, so an installed package finds them too.

File paths are relative to the catalog's ``root`` folder, which lies under a data root. The data
root is, in this order (:func:`data_roots`): the ``root=`` argument (``--root``), else the first of
``$STF_DATA_ROOT``, ``../shared/data/real`` beside a clone of the repository and
``$XDG_DATA_HOME/stf_pipeline`` (``~/.local/share/stf_pipeline``) that holds the catalog's folder.
A catalog's paths stay inside its folder: an absolute path or a ``..`` in ``root``, a file, a
glob or a layer is an error (point ``root=`` elsewhere instead), so a catalog cannot hand
arbitrary files of the machine to GDAL.

Held-out truth images go into the data variable ``fine_truth``; ``fine`` is NaN at their dates.

Schema (unknown keys are errors)::

    name: zhu_estarfm            # defaults to the file name
    description: free text
    root: zhu_estarfm            # folder under the data root
    download: where to get the files (shown when they are missing)
    bands: [green, red, nir]     # cube band names, in order
    coarse_factor: 20
    pixel_size: 30               # nominal, for files without georeferencing
    fine:   {sensor: ..., files: {2001-05-24: tm0524}}           # or glob: + date: {regex:, format:}
    coarse: {sensor: ..., resampling: nearest, glob: "MODIS/*.tif", date: {regex: "_(\\d{7})", format: "%Y%j"}}
    truth:  {files: {2001-07-11: tm0711}}                        # read with the fine sensor
    task:   {target: 2001-07-11, pairs: [2001-05-24, 2001-08-12], targets: [...], train: [...]}

``sensor`` is a preset name from :data:`stf_pipeline.ingest.SENSORS` or a mapping of Sensor
fields (``name, bands, scale, offset, nodata, units, valid_range``), optionally starting from a
preset (``preset: mod09ga``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from stf_pipeline._ingest import DEFAULT_CHUNKS, RESAMPLING, _opened, ingest
from stf_pipeline._schema import checked_keys, safe_load
from stf_pipeline.exceptions import CatalogError, TaskError
from stf_pipeline.sensors import AnySensor, DatePattern, Sensor, get_sensor
from stf_pipeline.task import Task, iso_date, resolve_task

#: environment variable that overrides the data root
DATA_ROOT_ENV = "STF_DATA_ROOT"
#: the package's folder of shipped catalogs (a link to the clone's top-level ``catalogs/``)
CATALOG_DIR = Path(str(importlib.resources.files("stf_pipeline") / "catalogs"))
#: the folder that holds ``stf_pipeline/`` (a clone's root when the package is not installed)
_CHECKOUT = Path(__file__).resolve().parents[1]


def data_roots() -> list[tuple[Path, str]]:
    """Where catalog folders are looked for when no ``root`` is passed, in order, each with why.

    ``$STF_DATA_ROOT`` when set (and then only it); else ``../shared/data/real`` beside the clone
    this package runs from (when it runs from one), then ``$XDG_DATA_HOME/stf_pipeline``
    (``~/.local/share/stf_pipeline``).
    """
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return [(Path(env).expanduser(), f"${DATA_ROOT_ENV}")]
    user = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "stf_pipeline"
    roots = [(user, "the user data folder")]
    if (_CHECKOUT / "pyproject.toml").is_file():  # running from a clone, not from an installed package
        roots.insert(0, ((_CHECKOUT.parent / "shared" / "data" / "real").resolve(), "beside the clone"))
    return roots


def data_root() -> Path:
    """The first existing folder of :func:`data_roots` (the first one when none exists)."""
    roots = [path for path, _ in data_roots()]
    return next((path for path in roots if path.is_dir()), roots[0])


def catalog_names() -> list[str]:
    """Names of the shipped catalogs."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))


def contained(path: str, where: str, *, pattern: bool = False) -> str:
    """``path`` if it is relative and has no ``..`` part (it stays inside its folder), else a CatalogError."""
    parts = Path(path).parts
    if Path(path).is_absolute() or ".." in parts or (not pattern and not parts):
        raise CatalogError(
            f"{where}: {path!r} must be a path inside the catalog's folder (relative, without '..'); "
            "to read files elsewhere, pass the data root (root= in Python, --root on the command line)."
        )
    return path


def _check_keys(mapping: Any, allowed: tuple[str, ...], where: str, required: tuple[str, ...] = ()) -> dict:
    return checked_keys(mapping, allowed, where, required=required, error=CatalogError)


def _date(value: Any, where: str) -> np.datetime64:
    try:
        return pd.Timestamp(value).to_datetime64().astype("datetime64[ns]")
    except (ValueError, TypeError):
        raise CatalogError(f"{where}: cannot read {value!r} as a date; use an ISO date such as 2001-05-24.") from None


_SENSOR_KEYS = ("preset", *(f.name for f in dataclasses.fields(Sensor)))


def _sensor(spec: Any, where: str) -> AnySensor:
    if isinstance(spec, str):
        return get_sensor(spec)
    spec = _check_keys(spec, _SENSOR_KEYS, where)
    preset = spec.pop("preset", None)
    if preset is not None:
        return dataclasses.replace(get_sensor(preset), **spec)
    if "bands" not in spec:
        raise CatalogError(f"{where}: a sensor needs 'bands' (the file's bands in order) or a 'preset'.")
    spec.setdefault("name", where)
    return Sensor(**spec)


@dataclasses.dataclass(frozen=True)
class FileGroup:
    """The files of one sensor in a catalog.

    Attributes
    ----------
    sensor : Sensor, SensorFamily or None
        None for truth files (read with the fine sensor).
    files : tuple of (ISO date, path relative to the catalog root) (explicit form)
    glob : str, optional
        Glob relative to the catalog root (pattern form); dates from ``date``.
    date : DatePattern, optional
    resampling : str
        Coarse -> fine resampling (coarse group only).
    """

    sensor: AnySensor | None
    files: tuple[tuple[str, str], ...] = ()
    glob: str | None = None
    date: DatePattern | None = None
    resampling: str = "nearest"

    @classmethod
    def from_mapping(cls, spec: Any, where: str, *, role: str) -> FileGroup:
        """``role``: ``fine`` or ``coarse`` (need a ``sensor``; coarse takes ``resampling``) or
        ``truth`` (read with the fine sensor)."""
        keys = {
            "fine": ("sensor", "files", "glob", "date"),
            "coarse": ("sensor", "files", "glob", "date", "resampling"),
            "truth": ("files", "glob", "date"),
        }[role]
        spec = _check_keys(spec, keys, where, required=("sensor",) if "sensor" in keys else ())
        if ("files" in spec) == ("glob" in spec):
            raise CatalogError(f"{where}: give exactly one of 'files' ({{date: path}}) or 'glob' (with 'date').")
        sensor = _sensor(spec["sensor"], f"{where}.sensor") if "sensor" in spec else None
        files: tuple[tuple[str, str], ...] = ()
        if "files" in spec:
            raw = spec["files"]
            if not isinstance(raw, Mapping) or not raw:
                raise CatalogError(f"{where}.files must be a non-empty mapping {{date: path}}, got {raw!r}.")
            files = tuple(
                (iso_date(_date(d, f"{where}.files")), contained(str(p), f"{where}.files")) for d, p in raw.items()
            )
        date = None
        if "date" in spec:
            d = _check_keys(spec["date"], ("regex", "format"), f"{where}.date", required=("regex", "format"))
            date = DatePattern(regex=str(d["regex"]), format=str(d["format"]))
        if "glob" in spec and date is None:
            raise CatalogError(f"{where}: 'glob' needs 'date: {{regex: ..., format: ...}}' to date each file.")
        resampling = str(spec.get("resampling", "nearest"))
        if resampling not in RESAMPLING:
            raise CatalogError(f"{where}.resampling {resampling!r} is not one of {list(RESAMPLING)}.")
        glob = contained(str(spec["glob"]), f"{where}.glob", pattern=True) if "glob" in spec else None
        return cls(sensor=sensor, files=files, glob=glob, date=date, resampling=resampling)

    def resolve(self, root: Path, where: str) -> dict[np.datetime64, Path]:
        """``{date: absolute path}`` under ``root``."""
        if self.glob is not None:
            found = sorted(root.glob(self.glob))
            if not found:
                raise CatalogError(
                    f"{where}: glob {self.glob!r} matches no file under {root}; check the data root "
                    f"(${DATA_ROOT_ENV}) and the catalog's root."
                )
            out: dict[np.datetime64, Path] = {}
            for path in found:
                date = self.date.parse(path.relative_to(root))  # type: ignore[union-attr]
                if date in out:
                    raise CatalogError(f"{where}: two files for {iso_date(date)}: {out[date]} and {path}.")
                out[date] = path
            return out
        return {_date(d, where): (root / p) for d, p in self.files}


@dataclasses.dataclass(frozen=True)
class CatalogTask:
    """Which dates a catalog's data set is for: the target, its pairs, evaluation targets, training dates."""

    target: str
    pairs: tuple[str, ...] | None = None
    targets: tuple[str, ...] = ()
    train: tuple[str, ...] = ()

    @classmethod
    def from_mapping(cls, spec: Any, where: str) -> CatalogTask:
        spec = _check_keys(spec, ("target", "pairs", "targets", "train"), where, required=("target",))

        def dates(key: str) -> tuple[str, ...]:
            value = spec.get(key) or []
            if not isinstance(value, list):
                raise CatalogError(f"{where}.{key} must be a list of dates, got {value!r}.")
            return tuple(iso_date(_date(v, f"{where}.{key}")) for v in value)

        target = iso_date(_date(spec["target"], f"{where}.target"))
        pairs = dates("pairs") if spec.get("pairs") is not None else None
        targets = dates("targets") or (target,)
        if target not in targets:
            raise CatalogError(f"{where}: target {target} must be one of targets {list(targets)}.")
        return cls(target=target, pairs=pairs, targets=targets, train=dates("train"))


@dataclasses.dataclass(frozen=True)
class Catalog:
    """A data set description loaded from ``catalogs/NAME.yaml`` (see the module docstring)."""

    name: str
    root: str
    bands: tuple[str, ...]
    fine: FileGroup
    coarse: FileGroup
    task: CatalogTask
    truth: FileGroup | None = None
    layers: tuple[tuple[str, str], ...] = ()
    coarse_factor: int | None = None
    pixel_size: float = 30.0
    description: str = ""
    download: str = ""
    source: str = ""

    @classmethod
    def from_mapping(cls, spec: Any, *, source: str = "<mapping>") -> Catalog:
        where = f"catalog {source}"
        spec = _check_keys(
            spec,
            (
                "name", "description", "download", "root", "bands", "coarse_factor", "pixel_size",
                "fine", "coarse", "truth", "layers", "task",
            ),
            where,
            required=("bands", "fine", "coarse", "task"),
        )
        bands = spec["bands"]
        if not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands):
            raise CatalogError(f"{where}: 'bands' must be a non-empty list of band names, got {bands!r}.")
        factor = spec.get("coarse_factor")
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1):
            raise CatalogError(f"{where}: coarse_factor must be a positive integer, got {factor!r}.")
        pixel_size = spec.get("pixel_size", 30.0)
        if isinstance(pixel_size, bool) or not isinstance(pixel_size, (int, float)) or not pixel_size > 0:
            raise CatalogError(f"{where}: pixel_size must be a positive number, got {pixel_size!r}.")
        layers = spec.get("layers", {}) or {}
        if not isinstance(layers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in layers.items()
        ):
            raise CatalogError(
                f"{where}: 'layers' must map variable names to single-band files, e.g. {{classes: map.tif}}; "
                f"got {layers!r}."
            )
        return cls(
            layers=tuple((k, contained(v, f"{where}: layers.{k}")) for k, v in layers.items()),
            name=str(spec.get("name", Path(source).stem)),
            root=contained(str(spec.get("root", "")), f"{where}: root", pattern=True),
            bands=tuple(bands),
            fine=FileGroup.from_mapping(spec["fine"], f"{where}: fine", role="fine"),
            coarse=FileGroup.from_mapping(spec["coarse"], f"{where}: coarse", role="coarse"),
            truth=FileGroup.from_mapping(spec["truth"], f"{where}: truth", role="truth") if "truth" in spec else None,
            task=CatalogTask.from_mapping(spec["task"], f"{where}: task"),
            coarse_factor=factor,
            pixel_size=float(pixel_size),
            description=str(spec.get("description", "")).strip(),
            download=str(spec.get("download", "")).strip(),
            source=source,
        )

    def root_path(self, root: str | os.PathLike[str] | None = None) -> Path:
        """The folder holding this catalog's files: ``<root>/<self.root>`` for an explicit
        ``root``, else under the first data root of :func:`data_roots` that has it.

        Raises
        ------
        CatalogError
            The folder is in none of the places looked at; the message lists them and says how
            to get the data.
        """
        if root is not None:
            looked = [(Path(root).expanduser(), "root= (--root)")]
        else:
            looked = data_roots()
        for base, _ in looked:
            if (base / self.root).is_dir():
                return base / self.root
        places = "; ".join(f"{base / self.root} ({why})" for base, why in looked)
        get = f" Get the files: {self.download}" if self.download else ""
        raise CatalogError(
            f"catalog {self.name}: its data folder {self.root or 'the data root'!r} was not found; looked in {places}."
            f"{get} Then put the folder {self.root!r} in one of those places, set ${DATA_ROOT_ENV} to the folder "
            "that holds it, or pass that folder as the data root (root= in Python, --root on the command line)."
        )


def _read_layer(path: Path, cube: xr.Dataset, where: str) -> xr.DataArray:
    """A static single-band ``(y, x)`` layer on the fine grid (e.g. a land-cover class map), values as stored."""
    if not path.is_file():
        raise CatalogError(f"{where}: file {path} does not exist; fix the path in the catalog.")
    with _opened(path) as src:  # class maps often carry no georeferencing: the fine grid gives it
        if src.subdatasets:  # a file of subdatasets (HDF, netCDF)
            raise CatalogError(
                f"{where}: {path.name} holds subdatasets; a layer must be a single-band raster (GeoTIFF)."
            )
        shape = (src.count, src.height, src.width)
        if src.count != 1 or shape[1:] != (cube.sizes["y"], cube.sizes["x"]):
            raise CatalogError(
                f"{where}: {path.name} has shape {shape} (band, y, x), but a layer must be one band on the fine "
                f"grid ({cube.sizes['y']}, {cube.sizes['x']}); resample it onto the fine grid first."
            )
        values = src.read(1)
    return xr.DataArray(values, dims=("y", "x"), attrs={"source": path.name})


def load_catalog(name_or_path: str | os.PathLike[str]) -> Catalog:
    """Load and validate a catalog: a shipped name (``"zhu_estarfm"``) or a path to a YAML file.

    Raises
    ------
    CatalogError
        Unknown name, missing file, invalid YAML, or a schema violation (naming the key).
    """
    import yaml

    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.exists()):
        path = CATALOG_DIR / f"{text}.yaml"
        if Path(text).name != text or not path.exists():
            raise CatalogError(
                f"unknown catalog {text!r}; shipped catalogs are {catalog_names()}, or pass a path to a YAML file."
            )
    if not path.is_file():
        raise CatalogError(f"catalog file {path} does not exist; check the path.")
    try:
        spec = safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CatalogError(f"catalog {path} is not valid YAML: {err}") from None
    return Catalog.from_mapping(spec, source=str(path))


def open_catalog(
    name_or_path: str | os.PathLike[str] | Catalog,
    *,
    root: str | os.PathLike[str] | None = None,
    chunks: Mapping[str, int] | None = DEFAULT_CHUNKS,
) -> tuple[xr.Dataset, Task]:
    """Read a catalog's files into a cube and return it with the catalog's fusion task.

    Parameters
    ----------
    name_or_path : str, path or Catalog
        Shipped catalog name (see ``catalogs/``), a YAML path, or a loaded :class:`Catalog`.
    root : path-like, optional
        Data root (the folder holding the catalog's ``root`` folder); default: the first of
        :func:`data_roots` that holds it.
    chunks : mapping, optional
        Dask chunks (default 512×512, lazy); ``None`` loads into NumPy.

    Returns
    -------
    cube : xarray.Dataset
        With ``fine`` NaN at held-out dates, ``fine_truth`` (fine and truth images), per-date
        ``fine_valid``/``coarse_valid``, and attrs ``catalog``, ``stf_targets`` and
        ``stf_train_times`` (ISO dates) for pipelines.
    task : Task
        The catalog's target date and its pair dates.

    Raises
    ------
    CatalogError
        See :func:`load_catalog` and :func:`stf_pipeline.ingest.ingest`.

    Examples
    --------
    >>> cube, task = stf.open_catalog("zhu_estarfm")  # doctest: +SKIP
    >>> pred = stf.fuse(cube, task.target, method="estarfm", pairs=task.pairs)  # doctest: +SKIP
    """
    catalog = name_or_path if isinstance(name_or_path, Catalog) else load_catalog(name_or_path)
    base = catalog.root_path(root)
    where = f"catalog {catalog.name}"
    fine = catalog.fine.resolve(base, f"{where}: fine")
    coarse = catalog.coarse.resolve(base, f"{where}: coarse")
    truth = catalog.truth.resolve(base, f"{where}: truth") if catalog.truth is not None else {}
    for date in truth:
        if date in fine:
            raise CatalogError(
                f"{where}: {iso_date(date)} has both a fine file and a truth file; a held-out date has no fine image."
            )
    cube = ingest(
        fine,
        coarse,
        truth=truth,
        bands=catalog.bands,
        fine_sensor=catalog.fine.sensor,  # type: ignore[arg-type]
        coarse_sensor=catalog.coarse.sensor,  # type: ignore[arg-type]
        coarse_factor=catalog.coarse_factor,
        resampling=catalog.coarse.resampling,
        pixel_size=catalog.pixel_size,
        chunks=chunks,
        attrs={
            "catalog": catalog.name,
            "title": catalog.name,
            "description": catalog.description,
            "stf_targets": list(catalog.task.targets),
            "stf_train_times": list(catalog.task.train),
        },
    )
    times = {iso_date(t) for t in cube["time"].values}
    for label, dates in (
        ("targets", catalog.task.targets), ("pairs", catalog.task.pairs or ()), ("train", catalog.task.train)
    ):
        missing = [d for d in dates if d not in times]
        if missing:
            raise CatalogError(f"{where}: task {label} {missing} are not dates of its files {sorted(times)}.")
    for name, file in catalog.layers:
        cube[name] = _read_layer(base / file, cube, f"{where}: layer {name!r}")
    try:
        task = resolve_task(cube, catalog.task.target, pairs=catalog.task.pairs, n_pairs=(1, 64))
    except TaskError as err:
        raise CatalogError(f"{where}: its task does not fit its files: {err}") from None
    return cube, task
