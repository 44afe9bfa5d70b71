"""Fixtures shared by the methods' tests."""

from __future__ import annotations

import pytest

from stf_pipeline.kernels.pallas import Layout


@pytest.fixture(
    params=[Layout(rows=3, width=8), Layout(rows=2, width=16, bands=1), Layout(rows=4, width=8, bands=2), None],
    ids=["3x8", "2x16-1band", "4x8-2bands", "default"],
)
def pallas_layout(request: pytest.FixtureRequest) -> Layout | None:
    """Pallas layouts to compare with one row a program: rows sharing each loaded neighbour row,
    band groups, and ``None`` (the method's own ``LAYOUT``); blocks that do not divide small scenes."""
    return request.param
