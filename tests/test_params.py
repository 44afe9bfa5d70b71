"""Method keyword arguments are checked against the parameter dataclass's type hints (stf_pipeline._params)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline._params import check_param_types
from stf_pipeline.exceptions import MethodError


@dataclasses.dataclass(frozen=True)
class Params:
    size: int = 3
    scale: float = 1.0
    flag: bool = False
    label: str = "a"
    mode: Literal["x", "y"] = "x"
    limit: int | None = None
    span: tuple[float, float] = (0.0, 1.0)
    values: tuple[tuple[float, ...], ...] | None = None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"size": "five"}, r"t: parameter size must be an integer, got 'five' \(str\)\."),
        ({"size": 5.0}, r"parameter size must be an integer, got 5.0 \(float\)"),
        ({"size": True}, r"parameter size must be an integer, got True \(bool\)"),
        ({"scale": "1"}, r"parameter scale must be a number, got '1' \(str\)"),
        ({"flag": 1}, r"parameter flag must be true or false, got 1 \(int\)"),
        ({"label": 3}, r"parameter label must be a string"),
        ({"mode": 1}, r"parameter mode must be 'x' or 'y', got 1 \(int\)"),
        ({"limit": 2.5}, r"parameter limit must be an integer or None, got 2.5"),
        ({"span": (0.0,)}, r"parameter span must be a list of 2 values \(a number, a number\), got \(0.0,\)"),
        ({"span": "ab"}, r"parameter span must be a list of 2 values"),
        ({"values": [[1.0], ["a"]]}, r"parameter values must be a list of lists of numbers or None"),
    ],
)
def test_wrong_types_name_the_parameter_and_the_type(values, message):
    with pytest.raises(MethodError, match=message):
        check_param_types(Params, values, method="t")


def test_accepted_values():
    check_param_types(
        Params,
        {
            "size": np.int64(4), "scale": 2, "flag": np.bool_(True), "label": "b", "mode": "z",  # choice: __post_init__
            "limit": None, "span": [0, 0.5], "values": ((1.0, 2.0), [3.0]),
        },
        method="t",
    )


def test_fuse_reports_the_parameter_type():
    cube = stf.synthetic_scene(height=32, width=32, n_times=4, seed=0)
    with pytest.raises(MethodError, match=r"delta: parameter window must be an integer, got 'five' \(str\)"):
        stf.fuse(cube, cube.time.values[1], method="delta", window="five")
    with pytest.raises(MethodError, match=r"starfm: parameter filtering must be 'strict' or 'either', got 2"):
        stf.fuse(cube, cube.time.values[1], method="starfm", filtering=2)
