"""How BiaSTF's fusion ``f`` should weight its two directions, measured without networks.

On each synthetic study scene (:data:`benchmarks._biastf_study.SCENES`), every target date is
predicted from its two pair dates by three stand-ins for a transitional prediction, then fused
by each candidate weighting with NumPy (float64), and scored by the mean over targets of the
band-mean RMSE against the truth:

- ``F(j) + dC``: the pair date's fine image plus the coarse change (``delta``'s form; the sensor
  bias left in);
- ``F(j) + dF̄``: plus the true fine change averaged over each coarse pixel (a perfect bias
  correction; what is left is the change within a coarse pixel);
- their mean (a correction that removes half the bias).

The candidates are functions of the coarse images only (what ``f`` sees at a target date):
``S`` the local mean ``|C(k) - C(j)|`` over the fusion window (the coarse factor, odd) and ``V``
the standard deviation of ``C(k) - C(j)`` over three coarse pixels. The oracle weights each
direction by the inverse of its true local mean squared error, the bound for any ``f`` of this
form.

    python -m benchmarks._fusion_weights [--scenes synthetic-cia,synthetic-lgc,synthetic-strong-bias]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from benchmarks._biastf_study import SCENES

EPS = 1e-3


def _mean(a: np.ndarray, radius: int) -> np.ndarray:
    from stf_pipeline.kernels.window import box_sum

    return box_sum(a, radius) / box_sum(np.ones_like(a), radius)


def _cell_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Mean over each ``factor²`` coarse pixel, repeated on the fine grid."""
    *lead, h, w = a.shape
    cells = a.reshape(*lead, h // factor, factor, w // factor, factor).mean(axis=(-3, -1))
    return np.repeat(np.repeat(cells, factor, -2), factor, -1)


#: name -> weight of one direction from (S, V)
CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "1/S (before)": lambda s, v: 1 / (s + EPS),
    "1/S^2": lambda s, v: (s + EPS) ** -2.0,
    "((S+eps)^2 + V^2)^-0.5": lambda s, v: ((s + EPS) ** 2 + v**2) ** -0.5,
    "((S+eps)^2 + V^2)^-0.75": lambda s, v: ((s + EPS) ** 2 + v**2) ** -0.75,
    "((S+eps)^2 + V^2)^-1": lambda s, v: 1 / ((s + EPS) ** 2 + v**2),
}


def fuse(
    preds: np.ndarray, change: np.ndarray, weight: Callable[[np.ndarray, np.ndarray], np.ndarray], factor: int
) -> np.ndarray:
    """The two directions ``preds`` ``(2, band, y, x)`` fused with ``weight(S, V)``, from their coarse
    changes ``change`` ``(2, band, y, x)``: ``S`` over the fusion window (``factor`` rounded up to
    odd), ``V`` over three coarse pixels (BiaSTF's defaults)."""
    window, spread = factor // 2, (3 * factor) // 2
    s = _mean(np.abs(change), window)
    v = np.sqrt(np.maximum(_mean(change**2, spread) - _mean(change, spread) ** 2, 0.0))
    w = weight(s, v)
    return (w * preds).sum(axis=0) / w.sum(axis=0)


def score_scene(name: str) -> dict[str, dict[str, float]]:
    """Mean RMSE of every candidate (and the oracle) for each stand-in on scene ``name``."""
    import stf_pipeline as stf

    spec = SCENES[name]["synthetic"]
    cube = stf.synthetic_scene(**spec).load()
    fine, coarse, truth = (cube[v].values.astype(np.float64) for v in ("fine", "coarse", "fine_truth"))
    factor = int(cube.attrs["coarse_factor"])
    known = list(spec["fine_times"])
    stand_ins: dict[str, Callable[[int, int], np.ndarray]] = {
        "F(j) + dC": lambda j, k: fine[j] + coarse[k] - coarse[j],
        "F(j) + dF̄": lambda j, k: fine[j] + _cell_mean(truth[k] - fine[j], factor),
    }
    stand_ins["mean of both"] = lambda j, k: 0.5 * (stand_ins["F(j) + dC"](j, k) + stand_ins["F(j) + dF̄"](j, k))
    out: dict[str, dict[str, float]] = {}
    for label, predict in stand_ins.items():
        rmse: dict[str, list[float]] = {c: [] for c in (*CANDIDATES, "oracle")}
        for k in (t for t in range(fine.shape[0]) if t not in known):
            pairs = (max(t for t in known if t < k), min(t for t in known if t > k))
            preds = np.stack([predict(j, k) for j in pairs])
            change = np.stack([coarse[k] - coarse[j] for j in pairs])
            inverse_error = 1 / (np.stack([_mean((p - truth[k]) ** 2, factor // 2) for p in preds]) + 1e-12)
            weights: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
                **CANDIDATES, "oracle": lambda s, v: inverse_error  # noqa: B023 - used in this iteration only
            }
            for c, weight in weights.items():
                fused = fuse(preds, change, weight, factor)
                rmse[c].append(float(np.sqrt(((fused - truth[k]) ** 2).mean(axis=(-2, -1))).mean()))
        out[label] = {c: float(np.mean(v)) for c, v in rmse.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", default="synthetic-cia,synthetic-lgc,synthetic-strong-bias")
    args = parser.parse_args(argv)
    columns = [*CANDIDATES, "oracle"]
    print("| scene | stand-in | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name in args.scenes.split(","):
        for label, scores in score_scene(name).items():
            print(f"| {name} | {label} | " + " | ".join(f"{scores[c]:.5f}" for c in columns) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
