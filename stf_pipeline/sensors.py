"""Sensors as data: how a product's files turn into cube reflectance, and which pixels to mask.

A :class:`Sensor` declares a product: the cube band stored in each band of a multi-band file
(``bands``, file order) or in each single-band file (``assets``: cube band -> the asset name
found in the file name, e.g. ``SR_B4``), the scale and offset that turn stored values into
reflectance, the fill value, how to read the acquisition date from a file name, and a quality
band (:class:`QAMask`) whose bit fields are decoded into a mask (masked pixels become NaN).

Presets are YAML files in ``stf_pipeline/sensor_presets/`` (one per sensor), loaded into
:data:`SENSORS`; a preset with ``members`` is a :class:`SensorFamily` that picks the member whose
``pattern`` matches each file (``landsat_c2_l2`` reads Landsat 5, 7, 8 and 9 files alike).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stf_pipeline.exceptions import CatalogError

PathLike = str | os.PathLike[str]


@dataclasses.dataclass(frozen=True)
class DatePattern:
    """Read a file's date from its path.

    Attributes
    ----------
    regex : str
        Regular expression searched in the path (as a POSIX string); its first group is the date.
    format : str
        ``strptime`` format of that group, e.g. ``"%Y%j"`` (year + day of year) or ``"%Y%m%d"``.
    """

    regex: str
    format: str

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.regex)
        except re.error as err:
            raise CatalogError(f"date regex {self.regex!r} is not a valid regular expression ({err}).") from None
        if compiled.groups < 1:
            raise CatalogError(f"date regex {self.regex!r} has no group; wrap the date part in (...).")

    def parse(self, path: PathLike) -> np.datetime64:
        """The date in ``path``, as ``datetime64[ns]``."""
        text = Path(path).as_posix()
        match = re.search(self.regex, text)
        if match is None:
            raise CatalogError(
                f"cannot read a date from {text!r}: regex {self.regex!r} does not match; "
                "fix the regex (--date-regex/--date-format) or list the file with its date explicitly."
            )
        try:
            stamp = pd.to_datetime(match.group(1), format=self.format)
        except ValueError as err:
            raise CatalogError(
                f"{match.group(1)!r} (from {text!r}) does not match date format {self.format!r}: {err}."
            ) from None
        return stamp.to_datetime64().astype("datetime64[ns]")


@dataclasses.dataclass(frozen=True)
class QARule:
    """One condition of a quality band: a bit field and the values of it that mark a bad pixel.

    Attributes
    ----------
    name : str
        What the rule masks (``"cloud"``, ``"cloud_shadow"``...).
    bits : (int, int)
        First and last bit of the field (bit 0 is the least significant), e.g. ``(3, 3)`` for one
        flag, ``(8, 9)`` for a two-bit confidence.
    mask : tuple of int
        Field values that mask the pixel (``(1,)`` for a set flag).
    keep : tuple of int, optional
        Instead of ``mask``: the only field values that keep the pixel (``(0,)`` for "0 = good").
    """

    name: str
    bits: tuple[int, int]
    mask: tuple[int, ...] = ()
    keep: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "mask", tuple(int(v) for v in self.mask))
        if self.keep is not None:
            object.__setattr__(self, "keep", tuple(int(v) for v in self.keep))
        if len(bits) != 2 or not 0 <= bits[0] <= bits[1] < 32:
            raise CatalogError(
                f"QA rule {self.name!r}: bits must be (first, last) with 0 <= first <= last < 32, got {bits}."
            )
        if bool(self.mask) == (self.keep is not None):
            raise CatalogError(
                f"QA rule {self.name!r}: give exactly one of 'mask' (bad values) or 'keep' (good values)."
            )

    def bad(self, qa: np.ndarray) -> np.ndarray:
        """Boolean array: where ``qa`` fails this rule."""
        first, last = self.bits
        field = (qa.astype(np.int64) >> first) & ((1 << (last - first + 1)) - 1)
        if self.keep is not None:
            return ~np.isin(field, self.keep)
        return np.isin(field, self.mask)


@dataclasses.dataclass(frozen=True)
class QAMask:
    """A quality band and the rules that turn it into a mask of bad pixels.

    Attributes
    ----------
    asset : str or mapping of str to str
        The quality band's asset name: found in the file name of a single-band file
        (``QA_PIXEL``) or as the band description of a multi-band file; a mapping
        cube band -> asset for products with one quality band per band (MCD43A4).
    rules : tuple of QARule
        Every condition the band encodes that can be masked.
    use : tuple of str, optional
        Names of the rules applied; default all of ``rules``.
    dilation : int, default 0
        Grow the mask by this many pixels (square neighbourhood, on the quality band's grid):
        cloud edges and thin shadows are often missed by the flags.
    """

    asset: str | Mapping[str, str] | tuple[tuple[str, str], ...]
    rules: tuple[QARule, ...]
    use: tuple[str, ...] | None = None
    dilation: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.asset, Mapping):
            object.__setattr__(self, "asset", tuple((str(b), str(a)) for b, a in self.asset.items()))
        rules = tuple(r if isinstance(r, QARule) else QARule(name=name, **r) for name, r in _named(self.rules))
        object.__setattr__(self, "rules", rules)
        names = [r.name for r in rules]
        if not rules or len(set(names)) != len(names):
            raise CatalogError(
                f"QA band {self.asset!r}: rules must be a non-empty list with unique names, got {names}."
            )
        use = tuple(names) if self.use is None else tuple(str(u) for u in self.use)
        unknown = [u for u in use if u not in names]
        if unknown:
            raise CatalogError(f"QA band {self.asset!r} has no rule(s) {unknown}; choose among {names}.")
        object.__setattr__(self, "use", use)
        if isinstance(self.dilation, bool) or int(self.dilation) != self.dilation or self.dilation < 0:
            raise CatalogError(
                f"QA band {self.asset!r}: dilation must be a whole number of pixels >= 0, got {self.dilation!r}."
            )
        object.__setattr__(self, "dilation", int(self.dilation))

    def asset_for(self, band: str) -> str:
        """The quality band's asset name for cube band ``band``."""
        if isinstance(self.asset, str):
            return self.asset
        found = dict(self.asset.items() if isinstance(self.asset, Mapping) else self.asset)
        if band not in found:
            raise CatalogError(f"the quality mask names no quality band for band {band!r}; add it to 'asset'.")
        return found[band]

    @property
    def asset_names(self) -> tuple[str, ...]:
        """Every quality band's asset name."""
        if isinstance(self.asset, str):
            return (self.asset,)
        pairs = self.asset.items() if isinstance(self.asset, Mapping) else self.asset
        return tuple(dict.fromkeys(a for _, a in pairs))

    def bad(self, qa: np.ndarray) -> np.ndarray:
        """Boolean array: where any used rule marks ``qa`` bad (or ``qa`` is NaN), grown by ``dilation`` pixels.

        ``qa`` has the quality band's pixels on its last two axes.
        """
        from scipy import ndimage

        missing = ~np.isfinite(qa) if np.issubdtype(qa.dtype, np.floating) else np.zeros(qa.shape, dtype=bool)
        if missing.any():  # a quality band read as float (a STAC loader's fill): no quality known -> bad
            qa = np.where(missing, 0, qa)
        bad = missing.copy()
        for rule in self.rules:
            if rule.name in (self.use or ()):
                bad |= rule.bad(qa)
        if self.dilation and bad.any():
            size = [1] * (bad.ndim - 2) + [2 * self.dilation + 1] * 2
            bad = ndimage.maximum_filter(bad, size=size, mode="constant", cval=False)
        return bad


def _named(rules: Any) -> list[tuple[str, Any]]:
    """``(name, rule)`` pairs from a tuple of QARule or a YAML mapping ``{name: {bits:, mask:}}``."""
    if isinstance(rules, Mapping):
        return list(rules.items())
    return [
        (r.name, r) if isinstance(r, QARule) else (str(r["name"]), {k: v for k, v in r.items() if k != "name"})
        for r in rules
    ]


@dataclasses.dataclass(frozen=True)
class Sensor:
    """How to turn one sensor's stored values into cube values.

    Attributes
    ----------
    name : str
        Short identifier (``"landsat8_c2_l2"``, ``"mod09ga"``...).
    bands : tuple of str
        Cube band name of each band of a multi-band file, in file order (``""`` for a band the
        cube never uses).
    assets : mapping of str to str, optional
        Cube band -> asset name of the single-band file (or band description) that holds it,
        e.g. ``{"red": "SR_B4"}``: how products shipped as one file per band are read.
    scale, offset : float
        ``value = stored * scale + offset`` (e.g. ``scale=1e-4`` for reflectance × 10000).
    nodata : float, optional
        Stored value that marks missing data; default: the file's own nodata tag.
    units : str, default "reflectance"
        Written to the variable's ``units`` attr.
    valid_range : (float, float), default (-0.5, 1.5)
        Scaled values must lie in this range (more than 0.1 % of valid pixels outside it is an
        error: a wrong scale factor or nodata value).
    clip : (float, float) or None, default (0.0, 1.0)
        Scaled values are clipped to this range, the cube contract's reflectance range (small
        negative reflectances are atmospheric-correction noise); ``None`` keeps them.
    date : DatePattern, optional
        How to read the acquisition date from a file name.
    pattern : str, optional
        Regular expression that this sensor's file names match (how a :class:`SensorFamily`
        tells its members' files apart).
    qa : QAMask, optional
        The quality band and its mask rules; the band must be present when a file is read
        (``ingest(..., mask=False)`` ignores it).
    description : str
        Free text: the product and its source.
    """

    name: str
    bands: tuple[str, ...] = ()
    assets: Mapping[str, str] | tuple[tuple[str, str], ...] | None = None
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    units: str = "reflectance"
    valid_range: tuple[float, float] = (-0.5, 1.5)
    clip: tuple[float, float] | None = (0.0, 1.0)
    date: DatePattern | None = None
    pattern: str | None = None
    qa: QAMask | None = None
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(str(b) for b in self.bands))
        if self.assets is not None:
            pairs = self.assets.items() if isinstance(self.assets, Mapping) else self.assets
            object.__setattr__(self, "assets", tuple((str(b), str(a)) for b, a in pairs))
        object.__setattr__(self, "valid_range", tuple(float(v) for v in self.valid_range))
        if isinstance(self.date, Mapping):
            object.__setattr__(self, "date", DatePattern(**self.date))
        if isinstance(self.qa, Mapping):
            object.__setattr__(self, "qa", QAMask(**self.qa))
        if self.clip is not None:
            object.__setattr__(self, "clip", tuple(float(v) for v in self.clip))
            if len(self.clip) != 2 or not self.clip[0] < self.clip[1]:
                raise CatalogError(
                    f"sensor {self.name!r}: clip must be (low, high) with low < high or null, got {self.clip}."
                )
        if not self.bands and not self.assets:
            raise CatalogError(
                f"sensor {self.name!r} declares no bands; list the file's bands in order ('bands') "
                "or the asset of each band ('assets')."
            )
        for names in (self.bands, [b for b, _ in self.asset_pairs]):
            named = [b for b in names if b]
            if len(set(named)) != len(named):
                raise CatalogError(f"sensor {self.name!r} has duplicate band names {list(names)}; make them unique.")
        if not (np.isfinite(self.scale) and self.scale != 0):
            raise CatalogError(f"sensor {self.name!r}: scale must be a finite non-zero number, got {self.scale!r}.")
        lo, hi = self.valid_range
        if len(self.valid_range) != 2 or not lo < hi:
            raise CatalogError(
                f"sensor {self.name!r}: valid_range must be (low, high) with low < high, got {self.valid_range}."
            )
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise CatalogError(
                    f"sensor {self.name!r}: pattern {self.pattern!r} is not a regular expression ({err})."
                ) from None

    @property
    def asset_pairs(self) -> tuple[tuple[str, str], ...]:
        """``(cube band, asset)`` of every band of single-band files (empty for multi-band files)."""
        if isinstance(self.assets, Mapping):
            return tuple(self.assets.items())
        return self.assets or ()

    @property
    def cube_bands(self) -> tuple[str, ...]:
        """The cube bands this sensor provides, in its own order."""
        if self.assets:
            return tuple(b for b, _ in self.asset_pairs)
        return tuple(b for b in self.bands if b)

    def asset(self, band: str) -> str:
        """Asset name (single-band file or band description) of cube band ``band``."""
        found = dict(self.asset_pairs)
        if band not in found:
            raise CatalogError(
                f"band {band!r} is not among sensor {self.name!r}'s bands {list(self.cube_bands)}; "
                "choose cube bands that both sensors provide or fix the sensor's band list."
            )
        return found[band]

    def band_index(self, band: str) -> int:
        """0-based position of cube band ``band`` in this sensor's multi-band files."""
        if band not in self.bands or not band:
            raise CatalogError(
                f"band {band!r} is not among sensor {self.name!r}'s bands {list(self.cube_bands)}; "
                "choose cube bands that both sensors provide or fix the sensor's band list."
            )
        return self.bands.index(band)

    def for_file(self, path: PathLike) -> Sensor:
        """The sensor that reads ``path``: this one (a family picks a member)."""
        return self

    def with_mask(self, use: Sequence[str] | None = None, *, dilation: int | None = None) -> Sensor:
        """A copy whose quality mask applies the rules ``use`` (default: unchanged) grown by ``dilation`` pixels."""
        if self.qa is None:
            raise CatalogError(f"sensor {self.name!r} has no quality band; it cannot take mask rules.")
        qa = dataclasses.replace(
            self.qa,
            use=self.qa.use if use is None else tuple(use),
            dilation=self.qa.dilation if dilation is None else dilation,
        )
        return dataclasses.replace(self, qa=qa)

    def without_mask(self) -> Sensor:
        """A copy that ignores the quality band."""
        return dataclasses.replace(self, qa=None)


@dataclasses.dataclass(frozen=True)
class SensorFamily:
    """Several sensors read through one name: each file is read by the member whose ``pattern`` it matches.

    Attributes
    ----------
    name : str
    members : tuple of Sensor
        Tried in order; each needs a ``pattern``.
    description : str
    """

    name: str
    members: tuple[Sensor, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.members or any(m.pattern is None for m in self.members):
            raise CatalogError(f"sensor family {self.name!r}: every member needs a file-name 'pattern'.")

    @property
    def cube_bands(self) -> tuple[str, ...]:
        """The cube bands every member provides, in the first member's order."""
        common = set.intersection(*(set(m.cube_bands) for m in self.members))
        return tuple(b for b in self.members[0].cube_bands if b in common)

    @property
    def date(self) -> DatePattern | None:
        return None

    def for_file(self, path: PathLike) -> Sensor:
        """The member whose ``pattern`` matches the file name of ``path``."""
        name = Path(path).name
        for member in self.members:
            if re.search(member.pattern, name):  # type: ignore[arg-type]
                return member
        raise CatalogError(
            f"{path} matches none of sensor {self.name!r}'s file patterns "
            f"{ {m.name: m.pattern for m in self.members} }; rename the file as the product names it or "
            "choose the sensor of the file (e.g. landsat8_c2_l2)."
        )

    def with_mask(self, use: Sequence[str] | None = None, *, dilation: int | None = None) -> SensorFamily:
        """Every member with :meth:`Sensor.with_mask` applied."""
        return dataclasses.replace(self, members=tuple(m.with_mask(use, dilation=dilation) for m in self.members))

    def without_mask(self) -> SensorFamily:
        """Every member without its quality band."""
        return dataclasses.replace(self, members=tuple(m.without_mask() for m in self.members))


AnySensor = Sensor | SensorFamily
#: folder of the preset YAML files (package data)
PRESET_DIR = "sensor_presets"


def _load_presets() -> dict[str, AnySensor]:
    """Every ``sensor_presets/*.yaml``: single sensors first, then families built from them."""
    from stf_pipeline._schema import safe_load

    specs = {}
    for entry in sorted(resources.files("stf_pipeline").joinpath(PRESET_DIR).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            spec = safe_load(entry.read_text())
            specs[str(spec["name"])] = spec
    presets: dict[str, AnySensor] = {}
    for name, spec in specs.items():
        if "members" not in spec:
            presets[name] = Sensor(**spec)
    for name, spec in specs.items():
        if "members" in spec:
            members = tuple(presets[m] for m in spec["members"])
            presets[name] = SensorFamily(name, members, spec.get("description", ""))  # type: ignore[arg-type]
    return presets


#: the sensor presets, by name (``stf_pipeline/sensor_presets/*.yaml``)
SENSORS: dict[str, AnySensor] = _load_presets()


def get_sensor(sensor: str | AnySensor) -> AnySensor:
    """Return a :class:`Sensor` (or :class:`SensorFamily`), looking a name up in :data:`SENSORS`."""
    if isinstance(sensor, (Sensor, SensorFamily)):
        return sensor
    if sensor not in SENSORS:
        raise CatalogError(f"unknown sensor {sensor!r}; use one of {sorted(SENSORS)} or declare a Sensor(...).")
    return SENSORS[sensor]
