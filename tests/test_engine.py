"""The engine: overlapping chunks give the unchunked result, lazily, for any chunking and halo."""

from __future__ import annotations

import datetime

import dask.array as da
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stf_pipeline as stf
from stf_pipeline.parallel import device_block_pixels, device_chunks, map_overlapping, plan_chunks
from stf_pipeline.testing import raise_if_dask_computes, random_cube

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def neighbourhood_kernel(fine, coarse, coarse_target, *, params, model=None):
    """Output depends on every input pixel within ``params`` pixels, with edge effects
    (windows are cut at the block edge): only a correct halo and trim reproduce the whole-array result."""
    radius = params
    stack = np.concatenate([fine, coarse, coarse_target[None]], axis=0).sum(axis=0)
    h, w = stack.shape[-2:]
    padded = np.pad(stack, ((0, 0), (radius, radius), (radius, radius)), constant_values=np.nan)
    out = np.zeros_like(stack)
    count = np.zeros_like(stack)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            window = padded[:, dy : dy + h, dx : dx + w] * (1 + dy + 3 * dx)
            valid = np.isfinite(window)
            out += np.where(valid, window, 0)
            count += valid
    with np.errstate(invalid="ignore"):
        return (out / count).astype(np.float32)


def _arrays(seed=0, pairs=2, shape=(2, 37, 29)):
    rng = np.random.default_rng(seed)
    fine = rng.random((pairs, *shape), dtype=np.float32)
    coarse = rng.random((pairs, *shape), dtype=np.float32)
    target = rng.random(shape, dtype=np.float32)
    fine[0, :, 3:6, 4:9] = np.nan
    return fine, coarse, target


@SETTINGS
@given(
    cy=st.integers(1, 40),
    cx=st.integers(1, 40),
    halo=st.integers(0, 12),
    align=st.sampled_from([1, 4]),
)
def test_map_overlapping_equals_whole_array(cy, cx, halo, align):
    fine, coarse, target = _arrays()
    whole = map_overlapping(neighbourhood_kernel, fine, coarse, target, halo=halo, params=halo)
    assert isinstance(whole, np.ndarray)
    chunked = map_overlapping(
        neighbourhood_kernel,
        da.from_array(fine, chunks=(1, 2, cy, cx)),
        da.from_array(coarse, chunks=(1, 2, cy, cx)),
        da.from_array(target, chunks=(2, cy, cx)),
        halo=halo,
        align=align,
        params=halo,
    )
    assert isinstance(chunked, da.Array) and chunked.dtype == np.float32
    np.testing.assert_array_equal(chunked.compute(scheduler="sync"), whole)


@SETTINGS
@given(cy=st.integers(4, 40), cx=st.integers(4, 40), halo=st.integers(0, 6))
def test_nan_padded_blocks_have_one_shape_and_the_whole_array_result(cy, cx, halo):
    # neighbourhood_kernel skips NaN as it skips "outside the block": NaN padding is invisible to it
    fine, coarse, target = _arrays()
    whole = map_overlapping(neighbourhood_kernel, fine, coarse, target, halo=halo, params=halo)
    shapes = []

    def recording(fine, coarse, coarse_target, **kwargs):
        shapes.append(fine.shape[-2:])
        return neighbourhood_kernel(fine, coarse, coarse_target, **kwargs)

    lazy = [da.from_array(a, chunks=(*a.shape[:-2], cy, cx)) for a in (fine, coarse, target)]
    padded = map_overlapping(recording, *lazy, halo=halo, padding="nan", params=halo)
    np.testing.assert_array_equal(padded.compute(scheduler="sync"), whole)
    assert len(set(shapes)) == 1
    assert shapes[0][0] >= max(padded.chunks[1]) and shapes[0][1] >= max(padded.chunks[2])


def test_kernel_padding_passes_the_largest_block_shape():
    fine, coarse, target = _arrays()
    seen = []

    def kernel(fine, coarse, coarse_target, *, params, pad_to, model=None):
        seen.append((fine.shape[-2:], pad_to))
        return neighbourhood_kernel(fine, coarse, coarse_target, params=params)

    lazy = [da.from_array(a, chunks=(*a.shape[:-2], 15, 12)) for a in (fine, coarse, target)]  # 37 x 29: 15,15,7
    out = map_overlapping(kernel, *lazy, halo=2, padding="kernel", params=2)
    np.testing.assert_array_equal(
        out.compute(scheduler="sync"), map_overlapping(neighbourhood_kernel, fine, coarse, target, halo=2, params=2)
    )
    assert {pad for _, pad in seen} == {(19, 16)}  # 15 + 2 halos by 12 + 2 halos: the interior block
    assert {shape for shape, _ in seen} == {(y, x) for y in (17, 19, 9) for x in (14, 16, 7)}
    assert map_overlapping(kernel, fine, coarse, target, halo=2, padding="kernel", params=2).shape == target.shape


def test_too_small_halo_is_detectably_wrong():
    """The reference above is sensitive: a halo one pixel short changes the result."""
    fine, coarse, target = _arrays()
    whole = map_overlapping(neighbourhood_kernel, fine, coarse, target, halo=3, params=3)
    short = map_overlapping(
        neighbourhood_kernel, *(da.from_array(a) for a in (fine, coarse, target)), halo=2, chunks=(10, 10), params=3
    )
    assert not np.array_equal(short.compute(scheduler="sync"), whole, equal_nan=True)


@SETTINGS
@given(length=st.integers(1, 300), nominal=st.integers(1, 120), halo=st.integers(0, 40), align=st.integers(1, 20))
def test_plan_chunks_cover_the_axis_with_chunks_no_smaller_than_the_halo(length, nominal, halo, align):
    ychunks, xchunks = plan_chunks((length, length), (nominal, nominal), halo=halo, align=align)
    assert ychunks == xchunks
    assert sum(ychunks) == length
    assert all(c >= min(halo, length) for c in ychunks)
    assert all(c % align == 0 for c in ychunks[:-1])  # every block starts on a multiple of align


@SETTINGS
@given(
    height=st.integers(1, 5000), width=st.integers(1, 5000), cy=st.integers(1, 3000), cx=st.integers(1, 3000),
    max_pixels=st.integers(0, 2**23),
)
def test_device_chunks_merge_whole_chunks_into_the_largest_block_that_fits(height, width, cy, cx, max_pixels):
    by, bx = device_chunks((height, width), (cy, cx), max_pixels)
    assert by % cy == 0 and bx % cx == 0  # whole chunks: each stored chunk is read by one block
    area = min(by, height) * min(bx, width)
    if (by, bx) != (cy, cx):
        assert area <= max_pixels
        assert area > min(cy, height) * min(cx, width)
    # no block of whole chunks that fits is larger (brute force over the chunk counts)
    best = max(
        (min(ky * cy, height) * min(kx * cx, width)
         for ky in range(1, -(-height // cy) + 1) for kx in range(1, -(-width // cx) + 1)
         if min(ky * cy, height) * min(kx * cx, width) <= max_pixels),
        default=0,
    )
    assert area >= min(best, area) and (area == best or (by, bx) == (cy, cx))


def test_device_chunks_by_hand(monkeypatch):
    assert device_chunks((2000, 2000), (1024, 1024), 2048**2) == (2048, 2048)  # the whole scene in one block
    assert device_chunks((10000, 10000), (2000, 2000), 2048**2) == (2000, 2000)  # two chunks do not fit
    assert device_chunks((10000, 10000), (500, 500), 2048**2) == (2000, 2000)  # 4 x 4, squarer than 8 x 2
    assert device_chunks((2000, 2000), (1024, 1024), 0) == (1024, 1024)
    monkeypatch.delenv("STF_DEVICE_BLOCK_PIXELS", raising=False)
    assert device_block_pixels() is None  # not asked for: the engine's default
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", "0")
    assert device_block_pixels() == 0
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", "4M")
    with pytest.raises(ValueError, match="STF_DEVICE_BLOCK_PIXELS='4M' is not a whole number"):
        device_block_pixels()


def test_a_local_gpu_fuses_merged_blocks_with_the_unchunked_numbers(monkeypatch):
    """With a budget set, on this process's GPU a jitted kernel gets the cube's chunks merged:
    fewer, larger blocks, the result in the cube's chunks with the unchunked numbers; chunks given
    by the caller, a NumPy kernel or a budget of 0 keep the cube's chunks as blocks."""
    import dataclasses

    from stf_pipeline import fusion
    from stf_pipeline.testing import _ShapeRecorder

    cube = _gappy(seed=3)
    target = cube.time.values[1]
    lazy_cube = cube.chunk({"time": 1, "y": 10, "x": 12})
    starfm = stf.get_method("starfm")

    def blocks(**kwargs):
        recorder = _ShapeRecorder(starfm.kernels["jax"])
        spec = dataclasses.replace(starfm, kernels={**starfm.kernels, "jax": recorder}, kernel=None)
        out = stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3, **kwargs)
        assert out.data.chunks[1:] == ((10,) * 4, (12,) * 4)  # the cube's chunks, whatever the blocks
        return out.values, recorder.seen

    eager = stf.fuse(cube, target, method="starfm", backend="jax", radius=3).values
    monkeypatch.setattr(fusion, "device_kind", lambda: "gpu")
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", str(20 * 24))
    values, seen = blocks()
    assert seen == [(23, 27)] * 4  # 2 x 2 blocks of 20 x 24 pixels and a 3-pixel halo (padded to one shape)
    np.testing.assert_allclose(values, eager, rtol=1e-6, atol=1e-6)
    assert blocks(chunks=(10, 12))[1] == [(16, 18)] * 16
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", "0")
    assert blocks()[1] == [(16, 18)] * 16
    assert stf.fuse(lazy_cube, target, method="delta").data.chunks[1:] == ((10,) * 4, (12,) * 4)


def test_a_local_gpu_runs_a_scene_that_fits_as_one_block_assembled_on_the_device(monkeypatch):
    """A kernel that takes device arrays (``device_inputs``) gets a scene that fits the budget as
    one block of JAX arrays (its chunks sent as read, joined on the device), with the unchunked
    numbers, the result in the cube's chunks and nothing computed while the graph is built; a
    larger scene, or a budget of 0, goes back to blocks of NumPy chunks."""
    import dataclasses

    import jax

    from stf_pipeline import fusion

    cube = _gappy(seed=3)
    target = cube.time.values[1]
    lazy_cube = cube.chunk({"time": 1, "y": 10, "x": 12})
    starfm = stf.get_method("starfm")
    seen: list[tuple[bool, tuple[int, ...]]] = []

    def device_kernel(fine, coarse, coarse_target, **kwargs):
        seen.append((all(isinstance(a, jax.Array) for a in (fine, coarse, coarse_target)), coarse_target.shape))
        return starfm.kernels["jax"](*(np.asarray(a) for a in (fine, coarse, coarse_target)), **kwargs)

    spec = dataclasses.replace(
        starfm, kernels={**starfm.kernels, "jax": device_kernel}, kernel=None, device_inputs=("jax",)
    )
    eager = stf.fuse(cube, target, method="starfm", backend="jax", radius=3).values
    monkeypatch.setattr(fusion, "device_kind", lambda: "gpu")
    monkeypatch.delenv("STF_DEVICE_BLOCK_PIXELS", raising=False)
    monkeypatch.setattr(fusion, "default_device_block_pixels", lambda: 40 * 48)  # the scene just fits
    out = stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3)
    assert seen == []  # building the graph computed nothing
    assert out.data.chunks[1:] == ((10,) * 4, (12,) * 4)
    np.testing.assert_allclose(out.values, eager, rtol=1e-6, atol=1e-6)
    assert seen == [(True, (2, 40, 48))]
    seen.clear()
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", str(40 * 48 - 1))  # too small for the scene: merged on the host
    np.testing.assert_allclose(stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3).values, eager,
                               rtol=1e-6, atol=1e-6)
    assert seen and not any(on_device for on_device, _ in seen)
    seen.clear()
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", "0")
    stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3).compute()
    assert len(seen) == 16 and not any(on_device for on_device, _ in seen)


def test_a_scene_block_the_device_cannot_hold_is_fused_in_tiles_with_the_same_numbers(monkeypatch, caplog):
    """Out of device memory for the whole scene, the block task fuses overlapping tiles of it,
    halved until they fit, and warns; other errors, and tiles that cannot shrink, are raised."""
    import dataclasses

    from stf_pipeline import fusion

    cube = _gappy(seed=4)
    target = cube.time.values[1]
    lazy_cube = cube.chunk({"time": 1, "y": 10, "x": 12})
    starfm = stf.get_method("starfm")
    shapes: list[tuple[int, int]] = []

    def small_device(fine, coarse, coarse_target, **kwargs):
        shapes.append(coarse_target.shape[-2:])
        if coarse_target.shape[-2] * coarse_target.shape[-1] > 20 * 24 * 1.6:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")
        return starfm.kernels["jax"](*(np.asarray(a) for a in (fine, coarse, coarse_target)), **kwargs)

    spec = dataclasses.replace(starfm, kernels={**starfm.kernels, "jax": small_device}, kernel=None,
                               device_inputs=("jax",))
    eager = stf.fuse(cube, target, method="starfm", backend="jax", radius=3).values
    monkeypatch.setattr(fusion, "device_kind", lambda: "gpu")
    monkeypatch.setenv("STF_DEVICE_BLOCK_PIXELS", str(40 * 48))
    monkeypatch.setattr("stf_pipeline.parallel._TOO_LARGE", [])  # this process's record, restored after
    with caplog.at_level("WARNING", logger="stf_pipeline.parallel"):
        values = stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3).values
    np.testing.assert_allclose(values, eager, rtol=1e-6, atol=1e-6)
    assert shapes[0] == (40, 48) and sorted(set(shapes[1:])) == [(23, 27)]  # 2 x 2 tiles with a 3-pixel halo
    assert "fusing it in 2 x 2 tiles" in caplog.text
    # remembered: by default, a scene as large now starts with the cube's chunks
    from stf_pipeline import parallel

    monkeypatch.setattr(parallel, "_device_memory_bytes", lambda: 2**40)
    assert parallel.default_device_block_pixels() == 40 * 48 - 1
    monkeypatch.setattr(parallel, "_TOO_LARGE", [])
    assert parallel.default_device_block_pixels() == 2**40 // parallel.DEVICE_BYTES_PER_PIXEL

    def broken(fine, coarse, coarse_target, **kwargs):
        raise RuntimeError("INTERNAL: something else")

    spec = dataclasses.replace(spec, kernels={**starfm.kernels, "jax": broken}, kernel=None)
    with pytest.raises(RuntimeError, match="INTERNAL: something else"):
        stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3).compute()
    shapes.clear()

    def no_memory(fine, coarse, coarse_target, **kwargs):
        shapes.append(coarse_target.shape[-2:])
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes.")

    spec = dataclasses.replace(spec, kernels={**starfm.kernels, "jax": no_memory}, kernel=None)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):  # tiles no larger than twice the halo: given up
        stf.fuse(lazy_cube, target, method=spec, backend="jax", radius=3).compute()
    assert shapes == [(40, 48), (23, 27), (13, 15), (8, 9)]  # the scene, then the first tile of 2², 4² and 8²


def test_method_spec_names_only_its_own_backends_as_device_inputs():
    import dataclasses

    starfm = stf.get_method("starfm")
    with pytest.raises(stf.MethodError, match=r"device_inputs \['jax'\] are not among its kernels"):
        dataclasses.replace(starfm, kernels={"numpy": starfm.kernels["numpy"]}, kernel=None, auto={},
                            reference=None, device_inputs=("jax",))


@SETTINGS
@given(cy=st.integers(2, 48), cx=st.integers(2, 48), window=st.sampled_from([1, 3, 5, 9, 15, 31]))
def test_fuse_chunked_equals_unchunked_bitwise(cy, cx, window):
    cube = _gappy(seed=1)
    target = cube.time.values[1]
    eager = stf.fuse(cube, target, method="delta", window=window)
    with raise_if_dask_computes():
        lazy = stf.fuse(cube.chunk({"time": 1, "y": cy, "x": cx}), target, method="delta", window=window)
    assert isinstance(lazy.data, da.Array)
    np.testing.assert_array_equal(lazy.compute(scheduler="sync").values, eager.values)


def test_halo_larger_than_chunk_is_rechunked_not_wrong():
    cube = _gappy(seed=2)
    target = cube.time.values[1]
    eager = stf.fuse(cube, target, method="delta", window=31)  # halo 15
    lazy = stf.fuse(cube.chunk({"time": 1, "y": 4, "x": 6}), target, method="delta", window=31)
    assert min(lazy.data.chunks[1]) >= 15 and min(lazy.data.chunks[2]) >= 15
    np.testing.assert_array_equal(lazy.values, eager.values)
    via_chunks = stf.fuse(cube, target, method="delta", window=31, chunks=(3, 3))
    np.testing.assert_array_equal(via_chunks.values, eager.values)


def _gappy(seed=0):
    cube = random_cube(n_times=3, height=40, width=48, seed=seed)
    fine = cube["fine"].values.copy()
    coarse = cube["coarse"].values.copy()
    fine[0, 0, 5:12, 30:40] = np.nan
    coarse[2, 1, 20:, :10] = np.nan
    return cube.copy(data={"fine": fine, "coarse": coarse})


def test_fuse_is_lazy_keeps_grid_and_records_provenance():
    cube = _gappy().chunk({"time": 1, "y": 16, "x": 16})
    with raise_if_dask_computes():
        pred = stf.fuse(cube, cube.time.values[1], method="delta", window=3)
    assert pred.dims == ("band", "y", "x") and pred.dtype == np.float32 and pred.name == "fine"
    assert pred.data.chunks == ((2,), (16, 16, 8), (16, 16, 16))
    np.testing.assert_array_equal(pred.x.values, cube.x.values)
    np.testing.assert_array_equal(pred.band.values, cube.band.values)
    assert pred.rio.crs.to_epsg() == 32633
    assert pred.time.values == cube.time.values[1]
    assert pred.attrs["method"] == "delta"
    assert pred.attrs["pairs"] == ["2020-03-01", "2020-04-02"]
    assert pred.attrs["stf_params"] == '{"window": 3, "eps": 1e-06}'
    assert pred.attrs["stf_pipeline_version"] == stf.__version__
    eager = stf.fuse(cube.compute(), cube.time.values[1], method="delta", window=3)
    assert isinstance(eager.data, np.ndarray)


@pytest.mark.parametrize(
    "date",
    [
        "2020-03-17",
        np.datetime64("2020-03-17"),
        np.datetime64("2020-03-17T00:00:00.000000000"),
        pd.Timestamp("2020-03-17"),
        datetime.date(2020, 3, 17),
    ],
)
def test_target_and_pairs_as_any_date_type(date):
    cube = _gappy()
    ref = stf.fuse(cube, cube.time.values[1], method="delta", pairs=list(cube.time.values[[0, 2]]))
    pred = stf.fuse(cube, date, method="delta", pairs=[np.datetime64("2020-03-01"), pd.Timestamp("2020-04-02")])
    np.testing.assert_array_equal(pred.values, ref.values)
    assert pred.attrs["target"] == "2020-03-17"


def test_errors_come_before_any_work():
    cube = _gappy().chunk({"time": 1, "y": 16, "x": 16})
    coarse = cube["coarse"].data.copy()
    no_target = cube.copy(data={"fine": cube["fine"].data, "coarse": da.where(
        (da.arange(3) == 1)[:, None, None, None], np.float32(np.nan), coarse)})
    no_target = no_target.assign_coords(coarse_valid=("time", [1.0, 0.0, 1.0]))
    with (
        raise_if_dask_computes(),
        pytest.raises(stf.TaskError, match="coarse image at target date 2020-03-17 is all NaN"),
    ):
        stf.fuse(no_target, "2020-03-17", method="delta")
    no_fine = cube.assign_coords(fine_valid=("time", [0.0, 1.0, 0.0]))
    with raise_if_dask_computes(), pytest.raises(stf.TaskError, match="pass pairs=") as err:
        stf.fuse(no_fine, "2020-03-17", method="delta")
    assert "2020-03-17" in str(err.value)
    with pytest.raises(stf.TaskError, match="is the target date"):
        stf.fuse(cube, "2020-03-17", method="delta", pairs=["2020-03-17"])
    with pytest.raises(stf.TaskError, match="cannot read 'yesterday' as a date"):
        stf.fuse(cube, "yesterday", method="delta")


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("order", [[0, 2], [2, 0], [1], [0, 1, 2], [2, 0, 1]])
def test_at_times_is_xarray_sel(order, chunked):
    # the pairs' images by position (views or take) equal xarray's label selection, in the order asked, for
    # in-memory and Dask cubes; a date the cube lacks raises a CubeError naming it
    from stf_pipeline.fusion import at_times

    cube = random_cube()
    if chunked:
        cube = cube.chunk({"y": 16, "x": 16})
    times = list(cube.time.values[order])
    got = at_times(cube["fine"], times)
    assert type(got) is type(cube["fine"].data)
    np.testing.assert_array_equal(np.asarray(got), cube["fine"].sel(time=times).values)
    with pytest.raises(stf.CubeError, match="1999-01-01"):
        at_times(cube["fine"], [times[0], np.datetime64("1999-01-01")])


def test_tasks_run_here_unless_a_client_or_another_scheduler_takes_them():
    import dask
    import dask.threaded
    from distributed import Client

    from stf_pipeline.parallel import local_scheduler, tasks_run_here

    assert tasks_run_here()
    assert local_scheduler() is dask.threaded.get  # distributed is imported here, with no Client
    with dask.config.set(scheduler="sync"):
        assert tasks_run_here()
    with dask.config.set(scheduler="processes"):
        assert not tasks_run_here()
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None):
        assert not tasks_run_here()
        assert local_scheduler() is None  # the Client's
    assert tasks_run_here()
