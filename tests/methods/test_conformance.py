"""Every registered method x every backend it declares passes :func:`stf_pipeline.testing.check_method`.

A method without an entry in ``CASES`` is checked with its default parameters on the default
cube. Learned methods (one training step of a tiny network, then the checks) are marked ``slow``:
compiling their networks for every block shape takes tens of seconds each on a CPU. No backend
is GPU-only today (``pallas`` runs interpreted on a CPU); one that is would be listed in
``GPU_ONLY`` and skipped where JAX's default device is a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline.exceptions import MethodError
from stf_pipeline.methods import available_methods, get_method
from stf_pipeline.methods._base import SceneStatistics, device_kind
from stf_pipeline.testing import DaskComputeError, check_method, random_cube

#: (method, backend) pairs that only run on a GPU.
GPU_ONLY: frozenset[tuple[str, str]] = frozenset()

#: learned methods: one training step of a tiny network (the contract, not the accuracy, is checked)
_LEARNED_CONFIG: dict[str, dict[str, Any]] = {
    "biastf": {
        "preset": "tiny",
        "train": {"steps": 1, "patch_size": 16, "batch_size": 2, "eval_every": 1, "checkpoint_every": 1,
                  "validate_initial": False},
    },
    "stfdcnn": {
        "nlm": {"widths": [4, 4, 4, 4]},
        "sr": {"widths": [4, 4, 4, 4]},
        "train": {"steps": 1, "batch_size": 2, "patch_size": 16, "eval_every": 1, "eval_batches": 1, "log_every": 1,
                  "checkpoint_every": 1, "progress": False, "warmup_steps": 0},
    },
}

#: per method: check_method keywords (cube, params, chunks, tolerances)
CASES: dict[str, dict[str, Any]] = {
    "delta": {"params": {"window": 5}, "chunks": (13, 15)},
    "starfm": {"params": {"radius": 3, "n_classes": 8.0}, "chunks": (13, 15)},
    # float32 device sums of ~100 terms against float64: a few ulp of the largest term
    "estarfm": {"params": {"half_window": 3}, "chunks": (13, 15), "reference_atol": 2e-5},
    # batched LAPACK solves may round differently with the batch (see fsdaf.core)
    "fsdaf": {
        "cube": random_cube(height=72, width=90, bands=("red", "nir", "swir1"), coarse_factor=6, seed=3),
        "params": {"n_classes": 3, "half_window": 5, "unmix_radius": 2, "tps_radius": 2, "n_pure": 10, "n_similar": 8},
        "chunks": (24, 30),
        "atol": 1e-6,
    },
    "biastf": {"cube": random_cube(n_times=4, height=48, width=56, seed=11), "chunks": (16, 16), "atol": 1e-5},
    "stfdcnn": {"cube": random_cube(n_times=4, height=64, width=64, seed=3), "chunks": (24, 24), "atol": 1e-5},
}


def _cases() -> list[Any]:
    out = []
    for name in available_methods():
        for backend in get_method(name).backends:
            marks = []
            if get_method(name).learned:
                marks.append(pytest.mark.slow)  # training and compiling the tiny networks: ~30 s each
            if (name, backend) in GPU_ONLY:
                marks.append(pytest.mark.skipif(device_kind() == "cpu", reason=f"{name}/{backend} needs a GPU"))
            out.append(pytest.param(name, backend, id=f"{name}-{backend}", marks=marks))
    return out


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    """Tiny one-step models of the learned methods (filled on first use), trained on dates other
    than the one the checks fuse."""
    return {}


def _model(name: str, cube: Any, cache: dict[str, Any]) -> Any:
    if not get_method(name).learned:
        return None
    if name not in cache:
        times = cube.time.values
        cache[name] = stf.train(cube, method=name, train_times=times[[0, 2, 3]], config=_LEARNED_CONFIG.get(name))
    return cache[name]


@pytest.mark.parametrize(("name", "backend"), _cases())
def test_method_conforms(name: str, backend: str, models: dict[str, Any]) -> None:
    case = dict(CASES.get(name, {}))
    cube = case.pop("cube", None) or random_cube()
    check_method(name, backend, cube=cube, model=_model(name, cube, models), **case)


def _no_halo(params: Any, context: Any) -> int:
    return 0


def _computes_statistics(fine: Any, coarse: Any, coarse_target: Any, params: Any) -> tuple[Any, ...]:
    return (np.asarray(fine).std(),)  # computes a Dask array: breaks laziness


def test_check_method_catches_a_too_small_halo_and_eager_statistics() -> None:
    delta = get_method("delta")
    with pytest.raises(AssertionError, match="chunked != unchunked"):
        check_method(dataclasses.replace(delta, halo=_no_halo), chunks=(13, 15), params={"window": 5})
    eager = dataclasses.replace(delta, statistics=SceneStatistics(_computes_statistics, lambda p, _std: p))
    with pytest.raises(DaskComputeError):
        check_method(eager, chunks=(13, 15))


def test_block_padding_is_validated_and_applies_to_jitted_backends_only() -> None:
    starfm = get_method("starfm")
    assert [starfm.padding_for(b) for b in ("numpy", "numba", "jax", "pallas")] == ["none", "none", "nan", "nan"]
    assert get_method("estarfm").block_padding == "nan" and get_method("biastf").block_padding == "kernel"
    assert {get_method(name).block_padding for name in ("delta", "fsdaf", "stfdcnn")} == {"none"}
    with pytest.raises(MethodError, match=r"block_padding 'zero' is not one of \['none', 'nan', 'kernel'\]"):
        dataclasses.replace(starfm, block_padding="zero")


def test_the_one_shape_check_catches_unpadded_ragged_blocks() -> None:
    from stf_pipeline.testing import _check_one_shape

    cube = random_cube()
    target = cube.time.values[1]
    eager = stf.fuse(cube, target, method="delta", window=5).values
    with pytest.raises(AssertionError, match="handed the kernel blocks of several shapes"):
        _check_one_shape(get_method("delta"), "numpy", cube, target, {"window": 5}, eager, 0.0, 0.0)
