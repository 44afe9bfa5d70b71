"""A fusion of an in-memory cube runs its kernel on views of the cube's arrays (no copy): the
cube must come back unchanged, NaN included."""

import numpy as np
import pytest

import stf_pipeline as stf


@pytest.mark.parametrize("method", ["delta", "starfm", "estarfm", "fsdaf"])
def test_fuse_leaves_an_in_memory_cube_unchanged(method):
    cube = stf.synthetic_scene(80, 80, n_times=3, seed=0, fine_times=[0, 2]).load()
    cube["fine"] = cube["fine"].astype(np.float32)
    cube["coarse"] = cube["coarse"].astype(np.float32)
    cube["fine"][0, 0, :7, :5] = np.nan  # a gap the kernels must not fill in place
    before = cube.copy(deep=True)
    t = cube.time.values
    pred = stf.fuse(cube, t[1], method=method, pairs=[t[0], t[2]] if method == "estarfm" else [t[0]])
    assert np.isfinite(pred.values).any()
    np.testing.assert_array_equal(cube["fine"].values, before["fine"].values)
    np.testing.assert_array_equal(cube["coarse"].values, before["coarse"].values)


def test_two_adjacent_pairs_fuse_on_a_view_and_leave_the_cube_unchanged():
    # two consecutive pair dates reach the kernel as one view of the cube (fusion.at_times)
    from stf_pipeline.fusion import at_times

    cube = stf.synthetic_scene(80, 80, n_times=3, seed=0, fine_times=[0, 1, 2]).load()
    cube["fine"] = cube["fine"].astype(np.float32)
    cube["coarse"] = cube["coarse"].astype(np.float32)
    cube["fine"][1, 0, :7, :5] = np.nan
    t = cube.time.values
    assert np.shares_memory(at_times(cube["fine"], [t[0], t[1]]), cube["fine"].values)
    before = cube.copy(deep=True)
    pred = stf.fuse(cube, t[2], method="starfm", pairs=[t[0], t[1]])
    assert np.isfinite(pred.values).any()
    np.testing.assert_array_equal(cube["fine"].values, before["fine"].values)
    np.testing.assert_array_equal(cube["coarse"].values, before["coarse"].values)


@pytest.mark.parametrize("order", [[0, 2], [0, 2, 4], [1, 4]])
def test_evenly_spaced_pair_dates_are_a_strided_view(order):
    # pairs around a target (k - 1, k + 1) are a strided view of the cube, not a copy
    from stf_pipeline.fusion import at_times

    cube = stf.synthetic_scene(24, 24, n_times=5, seed=0, fine_times=[0, 1, 2, 3, 4]).load()
    times = list(cube.time.values[order])
    got = at_times(cube["fine"], times)
    assert np.shares_memory(got, cube["fine"].values)
    np.testing.assert_array_equal(got, cube["fine"].values[order])


@pytest.mark.parametrize(
    ("method", "backend"), [("starfm", "numba"), ("estarfm", "numba"), ("starfm", "jax"), ("estarfm", "jax")]
)
def test_a_strided_view_fuses_as_a_contiguous_copy(method, backend):
    # the kernels (host and device transfers, scene statistics) give the same numbers on the strided
    # view of pairs k - 1, k + 1 as on a contiguous copy of them
    from stf_pipeline.fusion import prepare_fusion

    cube = stf.synthetic_scene(48, 48, n_times=3, seed=1, fine_times=[0, 2]).load()
    for name in ("fine", "coarse"):
        cube[name] = cube[name].astype(np.float32)
    t = cube.time.values
    small = {"starfm": {"radius": 4}, "estarfm": {"half_window": 4}}[method]
    call = prepare_fusion(cube, t[1], method=method, pairs=[t[0], t[2]], backend=backend, **small)
    fine, coarse, target = call.inputs(cube)
    assert not fine.flags.c_contiguous
    spec, params = call.spec, call.params
    from stf_pipeline.parallel import fill_statistics

    def run(f, c):
        p = fill_statistics(spec.statistics, f, c, target, params)
        return spec.kernel_for(call.backend)(f, c, target, params=p)

    np.testing.assert_array_equal(run(fine, coarse), run(np.ascontiguousarray(fine), np.ascontiguousarray(coarse)))


def test_to_device_stacks_a_strided_view_and_pads():
    # one transfer of the pieces; the strided view comes back as the dates it views, NaN-padded
    from stf_pipeline.kernels.device import to_device

    cube = np.arange(4 * 3 * 5 * 7, dtype=np.float64).reshape(4, 3, 5, 7)
    view, target = cube[::2], cube[1, :, :, :]
    padded = to_device((view, target), (8, 9))
    expected = np.pad(np.ascontiguousarray(view), [(0, 0), (0, 0), (0, 3), (0, 2)], constant_values=np.nan)
    np.testing.assert_array_equal(np.asarray(padded[0]), expected.astype(np.float32))
    assert padded[0].dtype == np.float32 and padded[1].shape == (3, 8, 9)
    as_is = to_device((view,))
    np.testing.assert_array_equal(np.asarray(as_is[0]), view.astype(np.float32))


def test_to_device_leaves_device_arrays_on_the_device(monkeypatch):
    # the engine's scene blocks arrive as JAX arrays: cast and padded there, never copied to the host
    import types

    import jax
    import jax.numpy as jnp

    from stf_pipeline.kernels import device

    def asarray(a, *args, **kwargs):
        assert not isinstance(a, jax.Array), "a device array was copied to the host"
        return np.asarray(a, *args, **kwargs)

    monkeypatch.setattr(device, "np", types.SimpleNamespace(**{**vars(np), "asarray": asarray}))
    on_device = jnp.arange(2 * 3 * 5 * 7, dtype=jnp.int32).reshape(2, 3, 5, 7)
    padded = device.to_device((on_device,), (6, 8))
    monkeypatch.undo()
    expected = np.pad(np.asarray(on_device, np.float32), [(0, 0), (0, 0), (0, 1), (0, 1)], constant_values=np.nan)
    np.testing.assert_array_equal(np.asarray(padded[0]), expected)
    assert padded[0].dtype == np.float32


def test_to_host_returns_the_device_array():
    # on a CPU the plain copy; on a GPU the same values through pinned host memory
    import jax.numpy as jnp

    from stf_pipeline.kernels.device import to_host

    values = jnp.arange(2 * 9 * 11, dtype=jnp.float32).reshape(2, 9, 11)[:, :7, :5]
    got = to_host(values)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.arange(2 * 9 * 11, dtype=np.float32).reshape(2, 9, 11)[:, :7, :5])
