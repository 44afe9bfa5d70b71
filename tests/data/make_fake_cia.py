"""Write small fake copies of the public CIA and LGC data sets (Emelyanova et al. 2013).

Same folder layout, file names, formats and value scale as the CSIRO downloads, so
``catalogs/cia.yaml`` and ``catalogs/lgc.yaml`` can be tested without the multi-GB originals:

    CIA/Landsat/2001_281_08oct/L71093084_08420011007_HRF_modtran_surf_ref_agd66.bil (+ .hdr)  ENVI BIL
    CIA/MODIS/2001_281_08oct/MOD09GA_A2001281.sur_refl.int (+ .hdr)                          ENVI BSQ
    LGC/Landsat/2004_107_Apr16/20040416_TM.int (+ .hdr)                                      ENVI BSQ
    LGC/MODIS/2004_107_Apr16/MOD09GA_A2004107.sur_refl.int (+ .hdr)                          ENVI BSQ

6 bands of int16 reflectance x 10000 on a georeferenced 25 m UTM 55S grid (``map info``); the
MODIS images are block means over ``factor`` x ``factor`` pixels, already on the Landsat grid as
in the originals. Values are seeded smooth random fields (not the real images).

Usage: ``python tests/data/make_fake_cia.py OUTDIR [--height 60 --width 40]``
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np

CIA_FOLDERS = (
    "2001_281_08oct 2001_290_17oct 2001_306_02nov 2001_313_09nov 2001_329_25nov 2001_338_04dec "
    "2002_005_05jan 2002_012_12jan 2002_044_13feb 2002_053_22feb 2002_069_10mar 2002_076_17mar "
    "2002_092_02apr 2002_101_11apr 2002_108_18apr 2002_117_27apr 2002_124_04may"
).split()
LGC_FOLDERS = (
    "2004_107_Apr16 2004_123_May02 2004_187_Jul05 2004_219_Aug06 2004_235_Aug22 2004_299_Oct25 "
    "2004_331_Nov26 2004_347_Dec12 2004_363_Dec28 2005_013_Jan13 2005_029_Jan29 2005_045_Feb14 "
    "2005_061_Mar02 2005_093_Apr03"
).split()


def _date(folder: str) -> dt.date:
    return dt.date(int(folder[:4]), 1, 1) + dt.timedelta(days=int(folder[5:8]) - 1)


def _header(rows: int, cols: int, interleave: str) -> str:
    return (
        "ENVI\n"
        f"samples = {cols}\nlines   = {rows}\nbands   = 6\nheader offset = 0\n"
        f"file type = ENVI Standard\ndata type = 2\ninterleave = {interleave}\nbyte order = 0\n"
        "map info = {UTM, 1.000, 1.000, 378000.000, 6170000.000, 2.5000000000e+01, 2.5000000000e+01, "
        "55, South, WGS-84, units=Meters}\n"
    )


def _write(path: Path, image: np.ndarray, interleave: str) -> None:
    """Write a ``(band, row, col)`` int16 image as ENVI (BSQ or BIL) with its ``.hdr``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image if interleave == "bsq" else image.transpose(1, 0, 2)  # bil: row, band, col
    np.ascontiguousarray(data, dtype="<i2").tofile(path)
    path.with_suffix(".hdr").write_text(_header(image.shape[1], image.shape[2], interleave))


def _images(n: int, rows: int, cols: int, factor: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.03, 0.45, size=(6, rows, cols))
    fine = np.clip(
        base[None] + rng.uniform(-0.05, 0.05, size=(n, 6, 1, 1)) + rng.normal(0, 0.01, (n, 6, rows, cols)), 0, 1
    )
    blocks = fine.reshape(n, 6, rows // factor, factor, cols // factor, factor).mean(axis=(3, 5))
    coarse = np.repeat(np.repeat(blocks, factor, axis=2), factor, axis=3) * 0.97 + 0.005
    return np.round(fine * 1e4).astype(np.int16), np.round(coarse * 1e4).astype(np.int16)


def make_fake(out: Path, *, height: int = 60, width: int = 40, factor: int = 20, seed: int = 0) -> Path:
    """Write fake ``CIA/`` and ``LGC/`` trees under ``out`` and return ``out``."""
    out = Path(out)
    fine, coarse = _images(len(CIA_FOLDERS), height, width, factor, seed)
    for i, folder in enumerate(CIA_FOLDERS):
        d = _date(folder) - dt.timedelta(days=1)  # Landsat names carry the UTC date, a day before
        sat = "L72" if folder == "2002_069_10mar" else "L71"
        name = f"{sat}093084_084{d:%Y%m%d}_HRF_modtran_surf_ref_agd66.bil"
        _write(out / "CIA" / "Landsat" / folder / name, fine[i], "bil")
        _write(out / "CIA" / "MODIS" / folder / f"MOD09GA_A{folder[:4]}{folder[5:8]}.sur_refl.int", coarse[i], "bsq")
    fine, coarse = _images(len(LGC_FOLDERS), height, width, factor, seed + 1)
    for i, folder in enumerate(LGC_FOLDERS):
        _write(out / "LGC" / "Landsat" / folder / f"{_date(folder):%Y%m%d}_TM.int", fine[i], "bsq")
        _write(out / "LGC" / "MODIS" / folder / f"MOD09GA_A{folder[:4]}{folder[5:8]}.sur_refl.int", coarse[i], "bsq")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=60)
    parser.add_argument("--width", type=int, default=40)
    args = parser.parse_args()
    print(make_fake(args.out, height=args.height, width=args.width))
