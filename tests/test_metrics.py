"""stf.evaluate against float64 NumPy hand computations, scikit-image SSIM and textbook cases."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.metrics import structural_similarity

import stf_pipeline as stf
from stf_pipeline.catalog import data_root
from stf_pipeline.metrics import EvaluationError, evaluate, ssim_radius
from stf_pipeline.testing import raise_if_dask_computes

REAL = data_root() / "zhu_estarfm"


def as_da(a: np.ndarray, *, bands=None, factor: int | None = 16, y0: float = 0.0) -> xr.DataArray:
    nb, ny, nx = a.shape
    bands = bands or [f"b{i}" for i in range(nb)]
    out = xr.DataArray(
        a,
        dims=("band", "y", "x"),
        coords={"band": bands, "y": y0 - 30.0 * np.arange(ny), "x": 30.0 * np.arange(nx)},
    )
    if factor is not None:
        out.attrs["coarse_factor"] = factor
    return out


# --- independent float64 references ------------------------------------------------------------


def gaussian_window(sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    return np.outer(k, k)


def ref_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Slow, explicit Wang et al. SSIM of one band over valid interior pixels (window loop)."""
    r = ssim_radius()
    g = gaussian_window(radius=r)
    valid = np.isfinite(x) & np.isfinite(y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(r, x.shape[0] - r):
        for j in range(r, x.shape[1] - r):
            if not valid[i, j]:
                continue
            win = (slice(i - r, i + r + 1), slice(j - r, j + r + 1))
            w = g * valid[win]
            w = w / w.sum()
            xs, ys = np.where(valid[win], x[win], 0), np.where(valid[win], y[win], 0)
            ux, uy = (w * xs).sum(), (w * ys).sum()
            vx = (w * (xs - ux) ** 2).sum()
            vy = (w * (ys - uy) ** 2).sum()
            vxy = (w * (xs - ux) * (ys - uy)).sum()
            values.append((2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values)) if values else np.nan


def ref_scores(p: np.ndarray, t: np.ndarray, *, ratio: float, mask: np.ndarray | None = None) -> dict:
    """Per-band and per-scene scores in float64 over pixels valid in every band."""
    p, t = p.astype(np.float64), t.astype(np.float64)
    valid = np.isfinite(p).all(0) & np.isfinite(t).all(0)
    if mask is not None:
        valid &= mask
    out: dict[str, list[float] | float] = {k: [] for k in ("rmse", "cc", "bias", "mae", "ssim")}
    rel = []
    for b in range(p.shape[0]):
        pb, tb = p[b][valid], t[b][valid]
        d = pb - tb
        out["rmse"].append(np.sqrt(np.mean(d**2)))
        out["bias"].append(np.mean(d))
        out["mae"].append(np.mean(np.abs(d)))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["cc"].append(np.corrcoef(pb, tb)[0, 1])
        rel.append((np.sqrt(np.mean(d**2)) / np.mean(tb)) ** 2)
        out["ssim"].append(ref_ssim(np.where(valid, p[b], np.nan), np.where(valid, t[b], np.nan), 1.0))
    out["ergas"] = 100 * ratio * np.sqrt(np.mean(rel))
    pv, tv = p[:, valid], t[:, valid]
    cos = (pv * tv).sum(0) / (np.linalg.norm(pv, axis=0) * np.linalg.norm(tv, axis=0))
    out["sam"] = float(np.mean(np.arccos(np.clip(cos, -1, 1))))
    out["n_valid"] = int(valid.sum())
    return out


def assert_matches(scores: xr.Dataset, ref: dict, *, atol: float = 1e-6) -> None:
    for name, value in ref.items():
        np.testing.assert_allclose(scores[name].values, value, rtol=0, atol=atol, err_msg=name)


# --- agreement with scikit-image and hand computations -----------------------------------------


def test_ssim_matches_skimage_exactly():
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 1, (3, 37, 41))
    p = np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1)
    scores = evaluate(as_da(p), as_da(t))
    ref = [
        structural_similarity(
            p[b], t[b], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        for b in range(3)
    ]
    np.testing.assert_allclose(scores.ssim.values, ref, rtol=0, atol=1e-12)


def test_ssim_data_range_per_band_matches_skimage():
    rng = np.random.default_rng(2)
    t = rng.uniform(290, 320, (2, 24, 24))
    p = t + rng.normal(0, 1.0, t.shape)
    ranges = {"lst": 40.0, "other": 10.0}
    scores = evaluate(as_da(p, bands=["lst", "other"]), as_da(t, bands=["lst", "other"]), data_range=ranges)
    ref = [
        structural_similarity(p[b], t[b], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=r)
        for b, r in enumerate(ranges.values())
    ]
    np.testing.assert_allclose(scores.ssim.values, ref, rtol=0, atol=1e-12)
    assert scores.attrs["ssim_data_range"] == [40.0, 10.0]


def test_all_metrics_match_float64_reference_with_nans():
    rng = np.random.default_rng(3)
    t = rng.uniform(0.05, 0.5, (3, 20, 22)).astype(np.float32)
    p = (t + rng.normal(0.01, 0.05, t.shape)).astype(np.float32)
    p[1, 3:6, 4:9] = np.nan  # invalid in one band -> excluded from all bands
    t[2, 10, 10] = np.nan
    scores = evaluate(as_da(p), as_da(t))
    assert_matches(scores, ref_scores(p, t, ratio=1 / 16))
    assert int(scores.n_valid) == 20 * 22 - 15 - 1


def test_nan_in_one_band_excludes_pixel_from_every_band():
    rng = np.random.default_rng(4)
    t = rng.uniform(0.1, 0.5, (2, 16, 16))
    p = t + 0.01
    p[0, 8, 8] = 5.0  # a wild value in band 0 ...
    p[1, 8, 8] = np.nan  # ... at a pixel that band 1 marks invalid: it must not count
    scores = evaluate(as_da(p), as_da(t))
    np.testing.assert_allclose(scores.rmse.values, [0.01, 0.01], atol=1e-12)


def test_mask_excludes_pixels():
    rng = np.random.default_rng(5)
    t = rng.uniform(0.1, 0.5, (2, 18, 18))
    p = t + rng.normal(0, 0.02, t.shape)
    mask = np.ones((18, 18), bool)
    mask[:, :6] = False
    scores = evaluate(as_da(p), as_da(t), mask=mask)
    assert_matches(scores, ref_scores(p, t, ratio=1 / 16, mask=mask))
    band_mask = xr.DataArray(np.broadcast_to(mask, (2, 18, 18)), dims=("band", "y", "x"))
    xr.testing.assert_allclose(evaluate(as_da(p), as_da(t), mask=band_mask), scores)


@pytest.mark.skipif(not REAL.exists(), reason="real ESTARFM sample data not available")
def test_real_landsat_modis_matches_reference():
    def read(name: str) -> np.ndarray:
        return np.fromfile(REAL / name, "<i2").reshape(3, 400, 400)[:, :120, :140].astype(np.float32) * 1e-4

    truth, coarse = read("tm0711"), read("modis0711")
    scores = evaluate(as_da(coarse), as_da(truth))
    ref = ref_scores(coarse, truth, ratio=1 / 16)
    ref["ssim"] = [
        structural_similarity(
            coarse[b].astype(np.float64), truth[b].astype(np.float64), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0,
        )
        for b in range(3)
    ]
    assert_matches(scores, ref)


# --- textbook cases ------------------------------------------------------------------------------


def test_identical_images_are_perfect():
    rng = np.random.default_rng(6)
    t = rng.uniform(0.1, 0.6, (4, 20, 20))
    s = evaluate(as_da(t), as_da(t))
    np.testing.assert_allclose(s.rmse, 0, atol=1e-15)
    np.testing.assert_allclose(s.mae, 0, atol=1e-15)
    np.testing.assert_allclose(s.bias, 0, atol=1e-15)
    np.testing.assert_allclose(s.cc, 1, atol=1e-12)
    np.testing.assert_allclose(s.ssim, 1, atol=1e-12)
    assert abs(float(s.ergas)) < 1e-12
    assert abs(float(s.sam)) < 1e-6  # arccos near 1 loses precision: sqrt(eps)


def test_constant_offset():
    rng = np.random.default_rng(7)
    t = rng.uniform(0.1, 0.6, (2, 20, 20))
    c = 0.05
    s = evaluate(as_da(t + c), as_da(t), ratio=30 / 480)
    np.testing.assert_allclose(s.rmse, c, atol=1e-12)
    np.testing.assert_allclose(s.bias, c, atol=1e-12)
    np.testing.assert_allclose(s.mae, c, atol=1e-12)
    np.testing.assert_allclose(s.cc, 1, atol=1e-12)
    expected = 100 * (30 / 480) * np.sqrt(np.mean((c / t.reshape(2, -1).mean(1)) ** 2))
    np.testing.assert_allclose(float(s.ergas), expected, rtol=1e-12)


def test_constant_images_ssim_is_luminance_term():
    a, b = 0.3, 0.4
    s = evaluate(as_da(np.full((1, 15, 15), b)), as_da(np.full((1, 15, 15), a)))
    c1 = 0.01**2
    np.testing.assert_allclose(float(s.ssim[0]), (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-12)
    assert np.isnan(float(s.cc[0]))  # correlation of constant images is undefined


@pytest.mark.parametrize("angle", [np.pi / 2, np.pi / 6])
def test_spectral_rotation_gives_its_angle(angle):
    rng = np.random.default_rng(8)
    t = rng.uniform(0.1, 0.5, (2, 12, 12))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    p = np.einsum("ij,jyx->iyx", rot, t)
    s = evaluate(as_da(p), as_da(t))
    np.testing.assert_allclose(float(s.sam), angle, atol=1e-12)


# --- dims, laziness, chunking --------------------------------------------------------------------


def test_extra_time_dim_gives_one_score_per_date():
    rng = np.random.default_rng(9)
    t = rng.uniform(0.1, 0.5, (2, 3, 16, 16))
    p = t + rng.normal(0, 0.02, t.shape)
    dims = ("time", "band", "y", "x")
    times = np.array(["2020-01-01", "2020-02-01"], dtype="datetime64[ns]")
    coords = {"time": times, "band": ["r", "g", "b"], "y": np.arange(16.0), "x": np.arange(16.0)}
    both = evaluate(xr.DataArray(p, dims=dims, coords=coords), xr.DataArray(t, dims=dims, coords=coords), ratio=0.1)
    assert both.rmse.dims == ("time", "band") and both.sam.dims == ("time",)
    for i in range(2):
        one = evaluate(as_da(p[i], bands=["r", "g", "b"]), as_da(t[i], bands=["r", "g", "b"]), ratio=0.1)
        np.testing.assert_allclose(both.isel(time=i).ssim, one.ssim, atol=1e-12)
        np.testing.assert_allclose(both.isel(time=i).ergas, one.ergas, atol=1e-12)


def test_chunked_equals_unchunked_and_computes_once():
    rng = np.random.default_rng(10)
    t = rng.uniform(0.05, 0.5, (3, 47, 53))
    p = t + rng.normal(0, 0.05, t.shape)
    p[0, 20:30, 5:12] = np.nan
    eager = evaluate(as_da(p), as_da(t))
    with raise_if_dask_computes(0):
        lazy = evaluate(as_da(p).chunk(y=6, x=11), as_da(t).chunk(y=20, band=1), compute=False)
    assert lazy.ssim.chunks is not None
    with raise_if_dask_computes(1):
        computed = lazy.compute()
    xr.testing.assert_allclose(computed, eager, rtol=1e-12, atol=1e-14)
    with raise_if_dask_computes(1):
        xr.testing.assert_allclose(evaluate(as_da(p).chunk(x=9), as_da(t)), eager, rtol=1e-12, atol=1e-14)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 3), st.integers(11, 18), st.integers(11, 18)),
    nan_fraction=st.sampled_from([0.0, 0.05, 0.3]),
    chunk=st.integers(5, 12),
)
def test_random_inputs_match_reference_and_chunking(data, shape, nan_fraction, chunk):
    values = st.floats(0.0625, 1.0, allow_nan=False, width=32)
    t = data.draw(hnp.arrays(np.float32, shape, elements=values))
    p = data.draw(hnp.arrays(np.float32, shape, elements=values))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    p[rng.random(shape) < nan_fraction] = np.nan
    valid = np.isfinite(p).all(0)
    if valid.sum() == 0:
        with pytest.raises(EvaluationError):
            evaluate(as_da(p), as_da(t))
        return
    scores = evaluate(as_da(p), as_da(t))
    ref = ref_scores(p, t, ratio=1 / 16)
    for name in ("cc",):  # undefined for constant inputs
        if not np.all(np.isfinite(ref[name])):
            ref.pop(name)
    assert_matches(scores, ref)
    chunked = evaluate(as_da(p).chunk(y=chunk, x=chunk), as_da(t).chunk(x=chunk + 1))
    xr.testing.assert_allclose(chunked, scores, rtol=1e-9, atol=1e-12)


def test_public_name_and_accessor():
    rng = np.random.default_rng(11)
    t = rng.uniform(0.1, 0.5, (2, 14, 14))
    p = as_da(t + 0.01)
    xr.testing.assert_identical(stf.evaluate(p, as_da(t)), p.stf.evaluate(as_da(t)))


def test_truth_bands_are_reordered_to_prediction():
    rng = np.random.default_rng(12)
    t = rng.uniform(0.1, 0.5, (2, 14, 14))
    p = t + np.array([0.01, 0.03])[:, None, None]
    swapped = as_da(t[::-1].copy(), bands=["b1", "b0"])
    s = evaluate(as_da(p), swapped)
    np.testing.assert_allclose(s.rmse.sel(band=["b0", "b1"]), [0.01, 0.03], atol=1e-12)


# --- bad input -----------------------------------------------------------------------------------


def test_errors_name_the_problem():
    rng = np.random.default_rng(13)
    t = as_da(rng.uniform(0.1, 0.5, (2, 14, 14)))
    with pytest.raises(EvaluationError, match="different grids"):
        evaluate(t, as_da(t.values, y0=300.0))
    with pytest.raises(EvaluationError, match="different grids"):  # a sixth of a 30 m pixel, far from the origin
        evaluate(t.assign_coords(x=t.x + 5e6), t.assign_coords(x=t.x + 5e6 + 5.0))
    with pytest.raises(EvaluationError, match="bands"):
        evaluate(t, as_da(t.values, bands=["red", "nir"]))
    with pytest.raises(EvaluationError, match="size along 'x'"):
        evaluate(t, t.isel(x=slice(0, 10)))
    with pytest.raises(EvaluationError, match="all NaN"):
        evaluate(t, xr.full_like(t, np.nan))
    with pytest.raises(EvaluationError, match="all NaN"):
        evaluate(t.chunk(x=7), xr.full_like(t, np.nan).chunk(x=7))
    with pytest.raises(EvaluationError, match="no pixel is valid"):
        evaluate(xr.full_like(t, np.nan), t)
    with pytest.raises(EvaluationError, match="lacks"):
        evaluate(t.isel(band=0), t.isel(band=0))
    with pytest.warns(UserWarning, match="coarse_factor"):
        no_ratio = evaluate(as_da(t.values, factor=None), as_da(t.values, factor=None))
    assert np.isnan(float(no_ratio.ergas)) and float(no_ratio.rmse[0]) == 0
    with pytest.raises(EvaluationError, match="ratio"):
        evaluate(t, t, ratio=16.0)
    with pytest.raises(EvaluationError, match="boolean"):
        evaluate(t, t, mask=np.ones((14, 14)))
    with pytest.raises(EvaluationError, match="shape"):
        evaluate(t, t, mask=np.ones((3, 3), bool))
    with pytest.raises(EvaluationError, match="data_range"):
        evaluate(t, t, data_range=0.0)
    assert issubclass(EvaluationError, stf.STFError)
