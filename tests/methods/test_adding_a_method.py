"""docs/adding-a-method.md, run as written: its example method passes the conformance suite, and
one registry line makes it a method of ``stf.fuse``."""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import stf_pipeline as stf
from stf_pipeline import methods
from stf_pipeline.exceptions import MethodError
from stf_pipeline.testing import random_cube

PAGE = Path(__file__).resolve().parents[2] / "docs" / "adding-a-method.md"


def _page_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The page's Python blocks, executed in order as the module ``stf_pipeline.methods.meanchange``."""
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 2, "the page shows the method's folder, then its conformance run"
    module = types.ModuleType("stf_pipeline.methods.meanchange")
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)  # found as if installed
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    for block in blocks:
        # the second block is the conformance run: it raises if the method fails it
        exec(compile(block, str(PAGE), "exec", dont_inherit=True), module.__dict__)
    return module


def test_the_example_method_conforms_and_registers_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _page_module(monkeypatch)
    line = re.search(r'^\s*"(\w+)": "([\w.]+)",$', PAGE.read_text(encoding="utf-8"), flags=re.M)
    assert line is not None and line.groups() == ("meanchange", module.__name__)
    monkeypatch.setitem(methods._MODULES, *line.groups())
    assert "meanchange" in stf.available_methods()
    cube = random_cube()
    t0, t1 = cube.time.values[:2]
    pred = stf.fuse(cube, t1, method="meanchange", pairs=[t0], radius=1).values
    # an independent reference: the 3x3 mean of the coarse change, by explicit loops
    change = (cube["coarse"].sel(time=t1) - cube["coarse"].sel(time=t0)).values.astype(np.float64)
    ny, nx = change.shape[1:]
    mean = np.empty_like(change)
    for y in range(ny):
        for x in range(nx):
            mean[:, y, x] = change[:, max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].mean(axis=(1, 2))
    want = cube["fine"].sel(time=t0).values + mean
    np.testing.assert_allclose(pred, want, rtol=0, atol=1e-6)
    with pytest.raises(MethodError, match="radius must be an integer >= 0"):
        stf.fuse(cube, t1, method="meanchange", radius=-1)
