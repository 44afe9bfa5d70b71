"""Extra per-pixel inputs (e.g. class maps) travel through the overlap engine like the images."""

import dask.array as da
import numpy as np

from stf_pipeline.parallel import map_overlapping


def _kernel(fine, coarse, coarse_target, *, params, extra):
    """Output = class map + 3x3 window sum of the target: depends on neighbours and on the extra input."""
    padded = np.pad(coarse_target, ((0, 0), (1, 1), (1, 1)), constant_values=0)
    window = sum(padded[:, 1 + dy : padded.shape[1] - 1 + dy, 1 + dx : padded.shape[2] - 1 + dx]
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return (window + extra["classes"][None] * params).astype(np.float32)


def test_extra_inputs_chunked_equal_unchunked():
    rng = np.random.default_rng(0)
    fine = rng.random((1, 2, 30, 26), dtype=np.float32)
    target = rng.random((2, 30, 26), dtype=np.float32)
    classes = rng.integers(0, 4, (30, 26)).astype(np.uint8)
    eager = map_overlapping(_kernel, fine, fine, target, halo=1, extra={"classes": classes}, params=10.0)
    lazy = map_overlapping(
        _kernel,
        da.from_array(fine, chunks=(1, 2, 8, 7)),
        da.from_array(fine, chunks=(1, 2, 8, 7)),
        da.from_array(target, chunks=(2, 8, 7)),
        halo=1,
        extra={"classes": da.from_array(classes, chunks=(5, 5))},
        params=10.0,
    )
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(eager, lazy.compute())
    np.testing.assert_array_equal(np.floor(eager[0] / 10 + 1e-6) >= 0, True)
