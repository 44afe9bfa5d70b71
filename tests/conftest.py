import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# tests leave the user's compilation cache (~/.cache/stf_pipeline/jax) alone; the cache's own
# tests turn it on in a temporary folder
os.environ.setdefault("STF_JAX_CACHE", "0")

import pytest  # noqa: E402

from stf_pipeline.testing import random_cube  # noqa: E402


@pytest.fixture
def small_cube():
    """3 dates, 2 bands, 40x48, NumPy-backed, CRS EPSG:32633, coarse_factor 8."""
    return random_cube()


@pytest.fixture(params=["numpy", "dask"])
def backend(request):
    """Run a test once on NumPy-backed and once on Dask-backed data."""
    return request.param
