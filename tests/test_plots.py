"""Figures: right panels, one shared stretch / colour scale, readable and unclipped labels, PNGs written."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from stf_pipeline import plots
from stf_pipeline.plots import PlotError

BANDS = ["blue", "green", "red", "nir", "swir1", "swir2"]


def image(seed: int, *, shift: float = 0.0, bands=BANDS, size: int = 48) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    base = np.linspace(0.05, 0.4, len(bands))[:, None, None]
    data = base + 0.05 * rng.standard_normal((len(bands), size, size)) + shift
    return xr.DataArray(
        data.astype(np.float32),
        dims=("band", "y", "x"),
        coords={"band": bands, "y": 1000.0 - 30 * np.arange(size), "x": 30.0 * np.arange(size)},
    )


@pytest.fixture
def scene():
    truth = image(0)
    preds = {"delta": image(1, shift=0.02), "starfm": image(2, shift=-0.01)}
    return truth, preds


def assert_readable(fig: Figure) -> None:
    """Everything drawn lies inside the figure (nothing clipped) and no text is smaller than 6 pt."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn = fig.get_tightbbox(canvas.get_renderer())
    inches = fig.get_size_inches()
    assert drawn.x0 >= -0.01 and drawn.y0 >= -0.01, f"clipped at the left/bottom: {drawn}"
    assert drawn.x1 <= inches[0] + 0.01 and drawn.y1 <= inches[1] + 0.01, f"clipped at the right/top: {drawn}"
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip():
            assert text.get_fontsize() >= 6, f"text {text.get_text()!r} is too small"


def test_composites_share_the_truth_stretch(scene, tmp_path):
    truth, preds = scene
    path = tmp_path / "composite.png"
    fig = plots.plot_composites(truth, preds, bands="true", zoom=(8, 24, 10, 26), path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = np.array(fig.axes).reshape(2, 3)
    limits = plots.stretch_limits(truth, ["red", "green", "blue"])
    for k, img in enumerate([truth, *preds.values()]):
        drawn = np.asarray(axes[0, k].images[0].get_array())
        np.testing.assert_allclose(drawn, plots.to_rgb(img, ["red", "green", "blue"], limits))
        np.testing.assert_allclose(np.asarray(axes[1, k].images[0].get_array()), drawn[8:24, 10:26])
        assert len(axes[0, k].patches) == 1  # the zoom box
    assert [ax.get_title() for ax in axes[0]] == ["truth", "delta", "starfm"]
    assert_readable(fig)
    for one in ({"delta": preds["delta"]}, {"a long method label": preds["delta"]}):
        assert_readable(plots.plot_composites(truth, one, bands="false"))  # a narrow figure wraps its title


def test_composite_limits_are_truth_percentiles(scene):
    truth, _ = scene
    limits = plots.stretch_limits(truth, ["nir", "red", "green"], (2, 98))
    expected = np.percentile(truth.sel(band="nir").values, [2, 98])
    np.testing.assert_allclose(limits[0], expected, rtol=1e-6)


def test_false_colour_grey_and_default_zoom(scene):
    truth, preds = scene
    preds = dict(preds)
    preds["delta"] = preds["delta"].copy()
    preds["delta"][:, 30:40, 5:15] += 0.3  # a large error: the default zoom goes there
    fig = plots.plot_composites(truth, preds, bands="false")
    box = fig.axes[0].patches[0]
    x0, y0 = box.get_x() + 0.5, box.get_y() + 0.5
    assert 18 <= y0 <= 30 and x0 <= 15
    grey = plots.plot_composites(truth, preds, bands=("nir",))
    drawn = np.asarray(grey.axes[0].images[0].get_array())
    np.testing.assert_allclose(drawn[..., 0], drawn[..., 1])
    assert "nir" in grey.axes[-1].get_ylabel()  # a grey composite gets a value scale
    assert_readable(grey)


def test_nan_pixels_are_transparent(scene):
    truth, preds = scene
    pred = preds["delta"].copy()
    pred[:, :4, :4] = np.nan
    rgba = plots.to_rgb(pred, ["red", "green", "blue"], plots.stretch_limits(truth, ["red", "green", "blue"]))
    assert (rgba[:4, :4, 3] == 0).all() and (rgba[4:, 4:, 3] == 1).all()


@pytest.mark.parametrize("kind", ["change", "bias"])
def test_change_and_bias_rows_share_a_symmetric_scale(scene, tmp_path, kind):
    truth, preds = scene
    other = image(5, shift=-0.05)
    path = tmp_path / f"{kind}.png"
    if kind == "change":
        fig = plots.plot_change(truth, preds, other, band="nir", reference_label="2020-01-01", path=path)
    else:
        fig = plots.plot_bias(truth, preds, other, band="nir", path=path)
    assert path.exists()
    panels = [ax for ax in fig.axes if ax.images]
    first_row, second_row = panels[:3], panels[3:]
    assert len(first_row) == 3 and len(second_row) == 2
    for row in (first_row, second_row):
        lims = {ax.images[0].get_clim() for ax in row}
        assert len(lims) == 1
        lo, hi = lims.pop()
        assert lo == pytest.approx(-hi)
    # the first panel is truth - other, the error panels prediction - truth
    np.testing.assert_allclose(
        np.asarray(first_row[0].images[0].get_array()),
        truth.sel(band="nir").values.astype(float) - other.sel(band="nir").values,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        np.asarray(second_row[0].images[0].get_array()),
        preds["delta"].sel(band="nir").values.astype(float) - truth.sel(band="nir").values,
        rtol=1e-6,
    )
    colorbars = [ax for ax in fig.axes if not ax.images and ax.get_ylabel()]
    assert len(colorbars) == 2 and "nir" in colorbars[0].get_ylabel()
    assert_readable(fig)


def test_scatter_counts_every_valid_pixel(scene, tmp_path):
    truth, preds = scene
    truth = truth.copy()
    truth[:, 0, :] = np.nan
    fig = plots.plot_scatter(truth, preds, bands=["red", "nir"], path=tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()
    panels = [ax.images[0] for ax in fig.axes[:4]]  # fig.axes[4] is the colour bar
    assert len(panels) == 4
    for panel in panels:
        total = np.nansum(np.asarray(panel.get_array()))
        assert total <= 47 * 48 and total >= 0.97 * 47 * 48  # within the 0.5-99.5 % limits
    assert "1:1" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert_readable(fig)


@pytest.mark.parametrize(
    "history, n_lines",
    [
        ([1.0, 0.5, 0.25], 1),
        ({"biastf": [1.0, 0.5], "stfdcnn": [0.8, 0.4, 0.2]}, 2),
        ({"step": [10, 20], "loss": [1.0, 0.3], "val_step": [20], "val_loss": [0.4]}, 2),
        ({"stage1": {"step": [1, 2], "loss": [1.0, 0.5]}, "stage2": {"step": [1, 2], "loss": [0.4, 0.1]}}, 2),
    ],
)
def test_loss_curves(history, n_lines, tmp_path):
    fig = plots.plot_losses(history, path=tmp_path / "loss.png")
    ax = fig.axes[0]
    assert len(ax.lines) == n_lines
    assert ax.get_yscale() == "log" and ax.get_legend() is not None
    if "stage2" in history:  # stages follow each other on one step axis
        assert ax.lines[1].get_xdata()[0] == 3
    assert_readable(fig)


def test_bad_input_errors(scene):
    truth, preds = scene
    with pytest.raises(PlotError, match="not in the image"):
        plots.plot_composites(
            truth.sel(band=["green", "red", "nir"]), {"a": preds["delta"].sel(band=["green", "red", "nir"])}
        )
    with pytest.raises(PlotError, match="outside"):
        plots.plot_composites(truth, preds, zoom=(0, 100, 0, 10))
    with pytest.raises(PlotError, match="same grid"):
        plots.plot_composites(truth, {"a": preds["delta"].isel(x=slice(0, 10))})
    with pytest.raises(PlotError, match="no predictions"):
        plots.plot_scatter(truth, {})
    with pytest.raises(PlotError, match="extra dims"):
        plots.plot_scatter(truth.expand_dims(time=2), preds)
    with pytest.raises(PlotError, match="empty"):
        plots.plot_losses([])


def _scale_bar(ax):
    """(length in pixels, label) of the scale bar drawn on ``ax``."""
    (line, _) = ax.lines[:2]
    xs = line.get_xdata()
    labels = [t.get_text() for t in ax.texts]
    return xs[1] - xs[0], labels


def test_composite_title_names_date_bands_and_stretch(scene):
    truth, preds = scene
    dated = truth.assign_coords(time=np.datetime64("2004-07-05"))
    fig = plots.plot_composites(dated, preds, bands="true", title="demo", zoom=(8, 24, 10, 26))
    title = " ".join(fig.get_suptitle().split())
    assert title == (
        "demo: 2004-07-05; true colour, R,G,B = red, green, blue; stretch 2–98 % per band of the truth, shared by "
        "all panels; yellow box: zoom, rows 8–24, cols 10–26"
    )
    fig = plots.plot_composites(truth, preds, bands=("swir2", "nir", "red"), date="2001-07-11", percentiles=(1, 99))
    title = " ".join(fig.get_suptitle().split())
    assert title.startswith("2001-07-11; R,G,B = swir2, nir, red; stretch 1–99 % per band of the truth")
    grey = plots.plot_composites(truth, preds, bands=("nir",))
    assert " ".join(grey.get_suptitle().split()).startswith("Grey = nir; stretch 2–98 %")


def test_composites_carry_a_scale_bar_in_ground_units(scene):
    truth, preds = scene  # 48 pixels of 30 m without a CRS: 1440 m wide, a quarter is 360 m -> a 200 m bar
    fig = plots.plot_composites(truth, preds, zoom=(8, 24, 10, 26))
    length, labels = _scale_bar(fig.axes[0])
    assert length == pytest.approx(200 / 30) and labels == ["200 m (nominal grid)"]
    length, labels = _scale_bar(fig.axes[3])  # the truth's zoom: 16 pixels = 480 m, a quarter 120 m -> 100 m
    assert length == pytest.approx(100 / 30) and labels == ["100 m (nominal grid)"]
    assert not fig.axes[1].lines  # on the truth panels only
    import rioxarray  # noqa: F401

    projected = truth.rio.write_crs("EPSG:32633")
    wide = projected.assign_coords(x=projected["x"] * 100)  # 3 km pixels: 144 km wide -> a 20 km bar
    fig = plots.plot_composites(wide, {k: v.assign_coords(x=wide["x"]) for k, v in preds.items()}, zoom=(8, 24, 10, 26))
    assert _scale_bar(fig.axes[0]) == (pytest.approx(20_000 / 3000), ["20 km"])
    geographic = truth.assign_coords(x=0.001 * np.arange(48)).rio.write_crs("EPSG:4326")
    fig = plots.plot_composites(geographic, {k: v.assign_coords(x=geographic["x"]) for k, v in preds.items()},
                                zoom=(8, 24, 10, 26))
    assert _scale_bar(fig.axes[0]) == (pytest.approx(0.01 / 0.001), ["0.01°"])
    assert_readable(fig)
    assert not plots.plot_composites(truth, preds, scale_bar=False).axes[0].lines
