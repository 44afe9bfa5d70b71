"""BiaSTF's networks ``G`` and ``B``: the normalisation statistics and the limit ``L`` fitted on the
training dates, the stacking of the input images into features, and the training batches."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from stf_pipeline.methods.biastf.config import NET_RADIUS, TABLE1_KERNELS, BiaSTFConfig


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Per-band constants fitted on the training dates and recorded in the model.

    Attributes
    ----------
    mean, scale : tuple of float
        Mean and standard deviation of the fine reflectance: ``F(j)``, ``C(j)`` and ``C(k)`` enter
        the networks as ``(x - mean) / scale``.
    change : tuple of float
        Standard deviation of the coarse change ``dC`` over the training pairs: ``dC``, ``G``'s
        output and both stages' targets are divided by it.
    conversion : tuple of tuple of float
        ``A`` (bands x bands): ``G``'s base ``A dC`` (``g_base="linear"``).
    limit : tuple of float
        ``L``, where the learned part starts to fade (:func:`trust_in_change`).
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    change: tuple[float, ...]
    conversion: tuple[tuple[float, ...], ...]
    limit: tuple[float, ...]

    @classmethod
    def identity(cls, n_bands: int) -> Statistics:
        """No normalisation, ``A = I``, no limit (models saved before these were recorded)."""
        eye = tuple(map(tuple, np.eye(n_bands).tolist()))
        return cls((0.0,) * n_bands, (1.0,) * n_bands, (1.0,) * n_bands, eye, (np.inf,) * n_bands)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (lists), as stored in ``model.extra["statistics"]``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_model(cls, model: Any) -> Statistics:
        """The model's statistics; a model without them predicts as before they existed."""
        n = len(model.bands)
        saved = model.extra.get("statistics")
        out = cls.identity(n)
        if saved is not None:
            out = cls(
                mean=tuple(saved["mean"]),
                scale=tuple(saved["scale"]),
                change=tuple(saved["change"]),
                conversion=tuple(tuple(row) for row in saved["conversion"]),
                limit=tuple(saved["limit"]),
            )
        elif model.extra.get("change_limit") is not None:
            out = dataclasses.replace(out, limit=tuple(model.extra["change_limit"]))
        return out

    def arrays(self) -> dict[str, Any]:
        """float32 NumPy arrays (traced arguments of the jitted predictor)."""
        return {k: np.asarray(v, np.float32) for k, v in dataclasses.asdict(self).items()}


#: ridge weight (relative to the mean diagonal of dC'dC) pulling the conversion ``A`` towards ``I``
CONVERSION_RIDGE = 1e-3


def fit_statistics(cube: xr.Dataset, times: Sequence[Any], factor: int | None, *, normalise: bool = True) -> Statistics:
    """:class:`Statistics` of ``times``: per-band moments, ``A`` and ``L``.

    ``A`` is the least-squares fit of the fine change averaged over each native coarse pixel to
    the coarse change there, over every pair of ``times``: ``dF_blocks ~ A dC`` (no intercept,
    ridge ``CONVERSION_RIDGE`` towards the identity). It undoes what is linear in the sensors'
    difference (gain, cross-band leakage) and holds for changes of any size.
    """
    step = max(int(factor or 1), 1)
    sel = cube.sel(time=list(times))
    coarse = _coarse_sample(cube, times, factor).astype(np.float64)  # (t, band, cy, cx)
    fine = sel["fine"].coarsen(y=step, x=step, boundary="trim").mean().values.astype(np.float64)
    fine_px = sel["fine"].isel(y=slice(step // 2, None, step), x=slice(step // 2, None, step)).values.astype(np.float64)
    n_bands = coarse.shape[1]
    limit = change_limit(coarse)
    cy, cx = min(fine.shape[2], coarse.shape[2]), min(fine.shape[3], coarse.shape[3])
    pairs = [(i, j) for i in range(len(times)) for j in range(i + 1, len(times))]
    dc = np.concatenate([(coarse[i] - coarse[j])[:, :cy, :cx].reshape(n_bands, -1) for i, j in pairs], axis=1)
    df = np.concatenate([(fine[i] - fine[j])[:, :cy, :cx].reshape(n_bands, -1) for i, j in pairs], axis=1)
    ok = np.isfinite(dc).all(0) & np.isfinite(df).all(0)
    x, y = dc[:, ok].T, df[:, ok].T  # (samples, band)
    conversion = np.eye(n_bands)
    if len(x) > 4 * n_bands:
        gram = x.T @ x
        ridge = CONVERSION_RIDGE * np.trace(gram) / n_bands
        conversion = np.eye(n_bands) + np.linalg.solve(gram + ridge * np.eye(n_bands), x.T @ (y - x)).T
    if not normalise:
        identity = Statistics.identity(n_bands)
        return dataclasses.replace(identity, conversion=tuple(map(tuple, conversion.tolist())), limit=tuple(limit))
    mean = np.nanmean(fine_px, axis=(0, 2, 3))
    scale = np.nanstd(fine_px, axis=(0, 2, 3))
    change = np.nanstd(dc, axis=1) if dc.size else np.ones(n_bands)
    floor = 1e-4  # reflectance: a constant band must not divide by zero
    return Statistics(
        mean=tuple(np.nan_to_num(mean).tolist()),
        scale=tuple(np.maximum(np.nan_to_num(scale), floor).tolist()),
        change=tuple(np.maximum(np.nan_to_num(change), floor).tolist()),
        conversion=tuple(map(tuple, conversion.tolist())),
        limit=tuple(limit),
    )


def _coarse_sample(cube: xr.Dataset, times: Sequence[Any], factor: int | None) -> np.ndarray:
    """The training dates' coarse images, one pixel per coarse pixel (``coarse_factor`` stride)."""
    step = max(int(factor or 1), 1)
    every = {"y": slice(step // 2, None, step), "x": slice(step // 2, None, step)}
    return cube["coarse"].sel(time=list(times)).isel(every).values


#: percentile of the training pairs' ``|dC|`` (per band) taken as the limit ``L``
CHANGE_PERCENTILE = 99.5




def change_limit(coarse: np.ndarray) -> list[float]:
    """Per-band ``L``: the ``CHANGE_PERCENTILE`` of ``|C(i) - C(j)|`` over all pairs of ``coarse``
    ``(time, band, y, x)``."""
    n = coarse.shape[0]
    changes = np.stack([np.abs(coarse[i] - coarse[j]) for i in range(n) for j in range(i + 1, n)])
    return [float(v) for v in np.nanpercentile(changes, CHANGE_PERCENTILE, axis=(0, 2, 3))]


def _per_band(values: Any) -> Any:
    """``(band,)`` constants shaped to broadcast over ``(n, band, y, x)``."""
    import jax.numpy as jnp

    return jnp.asarray(values, jnp.float32)[:, None, None]


def _features(names: Sequence[str], images: Mapping[str, Any], stats: Any) -> Any:
    """Normalised named ``(n, band, y, x)`` images stacked into ``(n, y, x, band, channel)``, NaN -> 0."""
    import jax.numpy as jnp

    mean, scale, change = _per_band(stats["mean"]), _per_band(stats["scale"]), _per_band(stats["change"])
    scaled = {
        "coarse_change": lambda a: a / change,
        "change_pred": lambda a: a / change,
        "fine_known": lambda a: (a - mean) / scale,
        "coarse_known": lambda a: (a - mean) / scale,
        "coarse_target": lambda a: (a - mean) / scale,
    }
    stacked = jnp.stack([scaled[name](images[name]) for name in names], axis=-1)
    return jnp.nan_to_num(jnp.transpose(stacked, (0, 2, 3, 1, 4)), nan=0.0, posinf=0.0, neginf=0.0)


def _valid_within(valid: Any, radius: int) -> Any:
    """True where ``valid`` holds at every pixel within ``radius`` (``(..., y, x)``); outside counts as valid."""
    import jax

    from stf_pipeline.kernels.window import window_reduce_jax

    return window_reduce_jax((~valid).astype("float32"), radius, jax.lax.max, 0.0) == 0


def _pair_images(fine_j: Any, coarse_i: Any, coarse_j: Any, mix_bands: bool) -> tuple[dict[str, Any], Any]:
    """Named inputs for predicting date i from date j, and where they are all valid (``(n, band, y, x)``).

    With ``mix_bands`` (a conversion across bands) a pixel needs the coarse change of every band.
    """
    import jax.numpy as jnp

    images = {
        "coarse_change": coarse_i - coarse_j,
        "fine_known": fine_j,
        "coarse_known": coarse_j,
        "coarse_target": coarse_i,
    }
    valid = jnp.isfinite(fine_j) & jnp.isfinite(coarse_j) & jnp.isfinite(coarse_i)
    if mix_bands:
        valid = valid & jnp.isfinite(images["coarse_change"]).all(axis=1, keepdims=True)
    return images, valid


def make_networks(config: BiaSTFConfig, n_bands: int, dtype: str) -> tuple[Any, Any]:
    """The untrained networks ``(G, B)`` of ``config`` (Table 1's layers) for ``n_bands`` bands.

    Parameters
    ----------
    config : BiaSTFConfig
        Sets the filters and whether one network serves all bands (``multiband``).
    n_bands : int
        Bands of the cube.
    dtype : str
        ``"float32"`` or ``"bfloat16"``: the networks' computation type.

    Returns
    -------
    tuple
        Two :class:`stf_pipeline.nn.modules.BandNet` whose last layer starts at zero, so an
        untrained ``G`` adds nothing to its base and an untrained ``B`` no bias.
    """
    import jax.numpy as jnp

    from stf_pipeline.nn.modules import BandNet

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32  # tensorfloat32: float32 at default precision
    band_net = functools.partial(
        BandNet,
        n_bands=n_bands,
        hidden=config.filters,
        kernel_sizes=TABLE1_KERNELS,
        multiband=config.multiband,
        zero_last=True,  # untrained G adds nothing to its base, untrained B no bias
        dtype=jdtype,
    )
    return band_net(), band_net()


def _channels_last(a: Any) -> Any:
    """``(n, band, y, x) -> (n, y, x, band)``."""
    import jax.numpy as jnp

    return jnp.transpose(a, (0, 2, 3, 1))


def _converted(images: Mapping[str, Any], stats: Any) -> Any:
    """``A dC`` ``(n, y, x, band)`` (NaN -> 0)."""
    import jax.numpy as jnp

    change = jnp.nan_to_num(_channels_last(images["coarse_change"]))
    return jnp.einsum("nyxb,ab->nyxa", change, jnp.asarray(stats["conversion"], jnp.float32))


#: the coarse reflectance below which the modulated base stays additive (its ratio would blow up)
MODULATION_FLOOR = 0.01


def _modulated(images: Mapping[str, Any]) -> Any:
    """The modulated change ``C(k) + g (F(j) - C(j)) - F(j)`` ``(n, y, x, band)`` (NaN -> 0), with
    ``g = min(1, max(C(k), floor) / C(j))`` where ``C(j) > floor`` (``MODULATION_FLOOR``), else 1.

    Where the coarse reflectance falls, the known image's detail ``F(j) - C(j)`` shrinks with it,
    as when a field floods or burns: the fine pixels converge on the new, darker cover instead of
    keeping their old contrast around it (``F(j) + dC``). Where it rises, ``g = 1`` is the
    additive change: contrast is never amplified, nor with it the known image's noise and the
    sensors' mismatch (``docs/methods/biastf.md``)."""
    import jax.numpy as jnp

    target, known, fine = images["coarse_target"], images["coarse_known"], images["fine_known"]
    ratio = jnp.maximum(target, MODULATION_FLOOR) / jnp.where(known > MODULATION_FLOOR, known, 1.0)
    gain = jnp.where(known > MODULATION_FLOOR, jnp.clip(ratio, 0.0, 1.0), 1.0)
    return jnp.nan_to_num(_channels_last(target - fine + gain * (fine - known)))


def _base(images: Mapping[str, Any], g_base: str, stats: Any) -> Any:
    """The change that ``F(j)`` takes without the networks, ``(n, y, x, band)`` (NaN -> 0): ``A dC``
    (``"linear"``), the modulated change (``"modulated"``, :func:`_modulated`) or ``dC``."""
    import jax.numpy as jnp

    if g_base == "linear":
        return _converted(images, stats)
    if g_base == "modulated":
        return _modulated(images)
    return jnp.nan_to_num(_channels_last(images["coarse_change"]))


def _g_base(images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """What ``G``'s network output is added to, ``(n, y, x, band)``: :func:`_base`, or 0."""
    import jax.numpy as jnp

    if not config.g_residual:
        return jnp.zeros_like(_channels_last(images["coarse_change"]))
    return _base(images, config.g_base, stats)


def _apply_g(g_model: Any, params: Any, images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """``G = base + change_scale x net(normalised inputs)``, ``(n, y, x, band)``."""
    import jax.numpy as jnp

    net = g_model.apply({"params": params}, _features(config.g_inputs, images, stats))
    return _g_base(images, config, stats) + net * jnp.asarray(stats["change"], jnp.float32)


def _apply_b(b_model: Any, params: Any, images: Mapping[str, Any], config: BiaSTFConfig, stats: Any) -> Any:
    """``B = change_scale x net(normalised inputs)``, ``(n, y, x, band)``."""
    import jax.numpy as jnp

    net = b_model.apply({"params": params}, _features(config.b_inputs, images, stats))
    return net * jnp.asarray(stats["change"], jnp.float32)


def _mixes_bands(config: BiaSTFConfig) -> bool:
    return config.g_residual and config.g_base == "linear"


def g_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig, stats: Statistics) -> Any:
    """Stage-1 batch: inputs ``g_inputs`` of ``(i, j)``, target ``(dF(i, j) - base) / change``."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    s = stats.arrays()
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1], _mixes_bands(config))
    target = (_channels_last(fine[:, 0] - fine[:, 1]) - _g_base(images, config, s)) / jnp.asarray(s["change"])
    mask = _channels_last(_valid_within(valid, NET_RADIUS)) & jnp.isfinite(target)
    return Batch(_features(config.g_inputs, images, s), jnp.nan_to_num(target), mask)


def b_batch(crops: Mapping[str, Any], aux: Any, *, config: BiaSTFConfig, stats: Statistics, g_model: Any) -> Any:
    """Stage-2 batch: inputs ``b_inputs`` (with the frozen ``G``'s output), target ``(dF - G) / change``.

    ``G``'s output is the crops' ``"change_pred"`` where the sampler holds it per item
    (:func:`frozen_g_outputs`), else ``G`` runs on the crops with the parameters ``aux``."""
    import jax.numpy as jnp

    from stf_pipeline.nn.sampler import Batch

    fine, coarse = crops["fine"], crops["coarse"]
    s = stats.arrays()
    images, valid = _pair_images(fine[:, 1], coarse[:, 0], coarse[:, 1], _mixes_bands(config))
    if "change_pred" in crops:  # G's output over the scene, computed once (frozen_g_outputs)
        g = _channels_last(crops["change_pred"][:, 0])
    else:
        g = _apply_g(g_model, aux, images, config, s)
    images["change_pred"] = jnp.transpose(g, (0, 3, 1, 2))
    target = (_channels_last(fine[:, 0] - fine[:, 1]) - g) / jnp.asarray(s["change"])
    mask = _channels_last(_valid_within(valid, 2 * NET_RADIUS)) & jnp.isfinite(target)
    return Batch(_features(config.b_inputs, images, s), jnp.nan_to_num(target), mask)


#: most bytes that :func:`frozen_g_outputs` may hold (beyond it, stage 2 runs ``G`` on every batch)
FROZEN_G_BYTES = 2 * 2**30


def frozen_g_outputs(
    g_model: Any, g_params: Any, fine: Any, coarse: Any, items: Sequence[tuple[int, int]], config: BiaSTFConfig,
    stats: Statistics,
) -> Any:
    """The frozen ``G``'s output ``(n_items, band, y, x)`` over the whole scene for each item
    ``(i, j)`` (predict date ``i`` from date ``j``) of the dates of ``fine`` and ``coarse``
    ``(time, band, y, x)``.

    Stage 2 crops its batches from these (``PatchSampler(per_item=...)``) instead of running
    ``G`` on every batch: one forward pass per pair instead of one per step, and ``G`` sees each
    patch with its surroundings, as at inference.
    """
    import jax
    import jax.numpy as jnp

    s = stats.arrays()

    @jax.jit
    def one(params: Any, fine_j: Any, coarse_i: Any, coarse_j: Any) -> Any:
        images, _ = _pair_images(fine_j[None], coarse_i[None], coarse_j[None], _mixes_bands(config))
        return jnp.transpose(_apply_g(g_model, params, images, config, s), (0, 3, 1, 2))[0]

    fine, coarse = jnp.asarray(fine, jnp.float32), jnp.asarray(coarse, jnp.float32)
    return jnp.stack([one(g_params, fine[j], coarse[i], coarse[j]) for i, j in items])
