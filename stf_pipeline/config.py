"""Pipeline configuration: a YAML file in ``pipelines/`` -> a frozen, validated :class:`PipelineConfig`.

Nothing here runs anything: :mod:`stf_pipeline.runner` runs a config, :mod:`stf_pipeline.cli` parses
the command line. Keys and values are checked while loading (an unknown key, a bad date, an unknown
method), method parameters by :meth:`PipelineConfig.check`, which the runner calls before any work
starts; every error names the key.

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

import dataclasses
import importlib.resources
import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import yaml

from stf_pipeline._schema import checked_keys
from stf_pipeline.cluster import ClusterConfig
from stf_pipeline.exceptions import ConfigError, MethodError
from stf_pipeline.methods import available_methods, get_method
from stf_pipeline.synthetic import synthetic_scene

CUBE_KINDS: tuple[str, ...] = ("synthetic", "catalog", "zarr")
#: the package's folder of shipped pipelines (a link to the clone's top-level ``pipelines/``)
PIPELINE_DIR = Path(str(importlib.resources.files("stf_pipeline") / "pipelines"))
#: keys of ``cube: {synthetic: {...}}``: the arguments of :func:`stf_pipeline.synthetic_scene`
SYNTHETIC_KEYS: tuple[str, ...] = tuple(inspect.signature(synthetic_scene).parameters)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _keys(mapping: Any, allowed: Sequence[str], where: str, required: Sequence[str] = ()) -> dict[str, Any]:
    return checked_keys(mapping, allowed, where, required=required, error=ConfigError)


def _freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class CubeSource:
    """Where a pipeline's cube comes from: ``kind`` is synthetic, catalog or zarr; ``options`` are the
    arguments of :func:`stf_pipeline.synthetic_scene`, :func:`stf_pipeline.open_catalog` (``name``,
    ``root``) or :func:`stf_pipeline.open_cube` (``path``)."""

    kind: str
    options: Mapping[str, Any]

    @classmethod
    def from_mapping(cls, spec: Any) -> CubeSource:
        """The source of a pipeline's ``cube:`` mapping (exactly one of :data:`CUBE_KINDS`)."""
        spec = _keys(spec, CUBE_KINDS, "cube")
        if len(spec) != 1:
            raise ConfigError(f"cube must have exactly one of {list(CUBE_KINDS)}, got {sorted(spec) or 'none'}.")
        ((kind, value),) = spec.items()
        if kind == "synthetic":
            options = _keys(value or {}, SYNTHETIC_KEYS, "cube.synthetic")
        elif kind == "catalog":
            options = (
                {"name": value} if isinstance(value, str) else _keys(value, ("name", "root"), "cube.catalog", ("name",))
            )
        else:
            options = {"path": value} if isinstance(value, str) else _keys(value, ("path",), "cube.zarr", ("path",))
        return cls(kind=kind, options=_freeze(options))


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """One method to run: a registered method, its parameters and, for a learned method, its
    training options. A pipeline's ``methods`` and the columns of :func:`stf_pipeline.compare` are these.

    Attributes
    ----------
    method : str
        Registered method name (stored in lower case).
    params : mapping
        Keyword arguments of :func:`stf_pipeline.fuse` for this method: its parameters and ``backend``.
    train : mapping, optional
        Options of :func:`stf_pipeline.train` for a learned method (``None``: the defaults).
    label : str
        The run's name in tables, figures and output files; default the method name. Two runs of
        one method need two labels.

    Raises
    ------
    MethodError
        If ``method`` is not a registered method.
    """

    method: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    train: Mapping[str, Any] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        method = str(self.method).lower()
        if method not in available_methods():
            raise MethodError(f"unknown method {self.method!r}; choose one of {available_methods()}.")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "params", _freeze(self.params))
        object.__setattr__(self, "train", None if self.train is None else _freeze(self.train))
        object.__setattr__(self, "label", str(self.label or method))

    @classmethod
    def from_mapping(cls, spec: Any, where: str) -> MethodRun:
        """The run of one entry of a pipeline's ``methods``: a name, or ``{name, params, train}``."""
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = _keys(spec, ("name", "params", "train"), where, ("name",))
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.params must be a mapping of the method's parameters, got {params!r}.")
        train = spec.get("train")
        if train is not None and not isinstance(train, Mapping):
            raise ConfigError(f"{where}.train must be a mapping of stf.train options or null, got {train!r}.")
        try:
            return cls(method=spec["name"], params=params, train=train)
        except MethodError as err:
            raise ConfigError(f"{where}: {err}") from None

    def check(self) -> None:
        """Check the parameters against the method (names and types) and ``train`` against its kind.

        Raises
        ------
        ConfigError
            Naming the run and the bad parameter.
        """
        spec = get_method(self.method)
        try:
            params = dict(self.params)
            spec.resolve_backend(str(params.pop("backend", "auto")))  # an argument of stf.fuse, not a parameter
            spec.make_params(**params)
        except (TypeError, MethodError) as err:
            raise ConfigError(f"method {self.label!r} params {dict(self.params)}: {err}") from None
        if self.train is not None and not spec.learned:
            raise ConfigError(f"method {self.label!r} is not learned; remove its 'train' entry.")


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
        """Validate a pipeline mapping (a YAML file's content); ``source`` names it in errors and gives
        the default ``name`` (the file's stem).

        Raises
        ------
        ConfigError
            Naming the bad key and what it accepts.
        """
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
            listed = {m.label: m for m in self.methods}
            unknown = [m for m in methods if m.lower() not in listed and m.lower() not in available_methods()]
            if unknown or not methods:
                raise ConfigError(
                    f"pipeline {self.name}: unknown method(s) {unknown or methods}; choose among the pipeline's "
                    f"{list(listed)} or any of {available_methods()}."
                )
            changes["methods"] = tuple(listed.get(m.lower(), MethodRun(m)) for m in methods)
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

    def check(self) -> None:
        """Check every method's parameters and training options (:meth:`MethodRun.check`); the runner
        calls it before any work starts.

        Raises
        ------
        ConfigError
            Naming the pipeline, the method and the bad parameter.
        """
        for run in self.methods:
            try:
                run.check()
            except ConfigError as err:
                raise ConfigError(f"pipeline {self.name}: {err}") from None


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
