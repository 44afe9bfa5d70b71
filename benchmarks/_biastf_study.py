"""``stf bench biastf study``: every method on the study scenes, scored as issue 15 asks.

The scenes (:data:`SCENES`):

- three synthetic ones, each with its own seed and sensor bias: the CIA-like split (phenology,
  no flood), the LGC-like split (a flood across the targets), and a strong-bias scene (more
  cross-band leakage, gain/offset spread, date-dependent atmosphere and a wider PSF, a flood
  late in the targets);
- the real sample sets with enough dates for a two-pair method (``zhu_estarfm``,
  ``imagefusion_kranj``; ``STF_DATA_ROOT`` must point at them).

On each scene, ``stf.compare`` runs ``delta``, STARFM, ESTARFM, FSDAF with their defaults, and
STFDCNN and BiaSTF trained by ``stf.train`` with their defaults (no config: sized to the
device, held-out-date validation) once per training seed. The training dates are the
scene's fine dates (the catalog's split for real sets), and the targets are the dates with
truth only. Scores are the mean over bands and target dates of RMSE, and of SSIM at the
truth's band range (per band, max - min over the targets).

Each scene writes ``OUT/study_<scene>.json``. ``--doc`` renders every JSON file found under
``OUT`` (subfolders too: runs of one scene made by several processes are merged) into one
Markdown page: a table per scene, the dates each method wins by RMSE, and BiaSTF against
ESTARFM. ``--render-only`` skips the runs. The records behind ``docs/study.md`` are kept in
``docs/study/``, so the page is rendered again without a GPU:

    stf bench biastf study --render-only --out docs/study --doc docs/study.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import describe_machine

CLASSICAL: tuple[str, ...] = ("delta", "starfm", "estarfm", "fsdaf")
LEARNED: tuple[str, ...] = ("stfdcnn", "biastf")
SCENES: dict[str, dict[str, Any]] = {
    "synthetic-cia": {
        "synthetic": {
            "height": 480,
            "width": 480,
            "n_times": 15,
            "seed": 0,
            "fine_times": [0, 1, 2, 3, 4, 5, 6, 14],
            "flood": False,
        },
        "about": "CIA-like: crop phenology, no flood; 8 training dates, 7 targets between them "
        "(seed 0, default sensor bias)",
    },
    "synthetic-lgc": {
        "synthetic": {
            "height": 480,
            "width": 480,
            "n_times": 14,
            "seed": 1,
            "fine_times": [0, 1, 2, 3, 4, 5, 12, 13],
            "flood": True,
            "flood_time": 7,
        },
        "about": "LGC-like: a flood peaking at the second of 6 targets; 8 training dates (seed 1, default sensor bias)",
    },
    "synthetic-strong-bias": {
        "synthetic": {
            "height": 480,
            "width": 480,
            "n_times": 14,
            "seed": 2,
            "fine_times": [0, 1, 2, 3, 4, 5, 6, 13],
            "flood": True,
            "flood_time": 10.5,
            "coarse_bias": {"leak": 0.1, "gain_spread": 0.3, "offset_spread": 0.05, "atmosphere": 0.025, "psf": 0.8},
        },
        "about": (
            "strong sensor bias (band leakage 10 %, gains 0.85-1.15, offsets, atmosphere twice the default, PSF sigma "
            "0.8 coarse pixels) and a flood late in the 6 targets; 8 training dates (seed 2)"
        ),
    },
    "zhu_estarfm": {
        "catalog": "zhu_estarfm",
        "about": "real Landsat-7/MODIS (ESTARFM sample), 3 bands, 2 training dates, 1 target",
    },
    "imagefusion_kranj": {
        "catalog": "imagefusion_kranj",
        "about": "real Landsat/MODIS 44 x 45 pixels, 2 training dates, 1 target",
    },
}


def _machine() -> dict[str, Any]:
    """:func:`describe_machine`, or its JAX part where ``distributed`` (memory size) cannot load."""
    try:
        return describe_machine()
    except ImportError:
        import os
        import platform

        import jax

        return {
            "cpu": platform.processor(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "devices": [getattr(d, "device_kind", str(d)) for d in jax.devices()],
        }


def _cube(spec: dict[str, Any], size: int | None = None) -> Any:
    import stf_pipeline as stf

    if "synthetic" in spec:
        options = {**spec["synthetic"], **({"height": size, "width": size} if size else {})}
        return stf.synthetic_scene(**options).load()
    cube, _ = stf.open_catalog(spec["catalog"])
    return cube.load()


def _data_range(cube: Any, targets: list[Any]) -> dict[str, float]:
    truth = cube["fine_truth"].sel(time=targets)
    span = truth.max(("time", "y", "x")) - truth.min(("time", "y", "x"))
    return {str(b): float(v) for b, v in zip(span["band"].values, span.values, strict=True)}


def machine_label(machine: dict[str, Any]) -> str:
    """Short name of the machine a record was measured on: its JAX devices (or CPU) and cores."""
    devices = machine.get("devices") or []
    if machine.get("jax_backend") == "cpu" or not devices:
        return f"{machine.get('cpu')}, {machine.get('cores')} cores (JAX {machine.get('jax')})"
    return f"{', '.join(devices)} (JAX {machine.get('jax')})"


def _scores(result: Any) -> dict[str, dict[str, list[float]]]:
    scores = result.scores
    return {
        str(run): {
            "rmse": [float(v) for v in scores["rmse"].sel(run=run).mean("band").values],
            "ssim": [float(v) for v in scores["ssim"].sel(run=run).mean("band").values],
        }
        for run in scores["run"].values
    }


def run_scene(
    name: str,
    seeds: list[int],
    methods: list[str],
    *,
    size: int | None = None,
    preset: str | None = None,
    biastf_config: dict[str, Any] | None = None,
    save: Any = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Train and compare every method on scene ``name``; returns the JSON-able record.

    ``save(record)`` is called after every method (a run cut short keeps what finished).
    ``biastf_config`` is merged into BiaSTF's configuration (ablations; recorded in the run).
    ``size`` shrinks the synthetic scenes and ``preset`` names a config preset of the learned
    methods (both for quick checks; the study uses neither)."""
    import numpy as np

    import stf_pipeline as stf
    from stf_pipeline.comparison import resolve_targets
    from stf_pipeline.exceptions import STFError
    from stf_pipeline.training import default_train_times

    spec = SCENES[name]
    cube = _cube(spec, size)
    targets = resolve_targets(cube, cube.attrs.get("stf_targets") or None, "fine_truth")
    data_range = _data_range(cube, targets)
    train_times = default_train_times(cube)
    record: dict[str, Any] = {
        "scene": name,
        "about": spec["about"],
        "machine": _machine(),
        "targets": [str(np.datetime_as_string(t, unit="D")) for t in targets],
        "train_times": train_times,
        "runs": {},
        "size": size,
        "preset": preset,
    }
    for method in (m for m in methods if m in CLASSICAL):
        start = time.perf_counter()
        try:
            result = stf.compare(cube, methods=[method], targets=targets, data_range=data_range, figures=False)
        except STFError as err:  # e.g. a default search window larger than a small scene
            record.setdefault("failed", {})[method] = str(err)
            echo(f"[{name}] {method} cannot run with its defaults: {err}")
            continue
        record["runs"][method] = {"method": method, **_scores(result)[method]}
        echo(f"[{name}] {method}: {time.perf_counter() - start:.1f} s")
        if save is not None:
            save(record)
    for seed in seeds:
        for method in (m for m in methods if m in LEARNED):
            config: dict[str, Any] = (
                {"stage1": {"seed": seed}, "stage2": {"seed": seed + 1}}
                if method == "biastf"
                else {"train": {"seed": seed}}
            )
            if preset:
                config["preset"] = preset
            if method == "biastf" and biastf_config:
                config.update(biastf_config)
            start = time.perf_counter()
            model = stf.train(cube, method=method, train_times=train_times, config=config)
            train_s = time.perf_counter() - start
            result = stf.compare(
                cube, methods=[method], targets=targets, models={method: model}, data_range=data_range, figures=False
            )
            ablations = {}
            if method == "biastf":  # what each part of the model brings, on the same trained networks
                variants: dict[str, tuple[Any, dict[str, Any]]] = {
                    part: (m, {}) for part, m in biastf_ablations(model).items()
                }
                variants.update({part: (model, params) for part, params in INFERENCE_VARIANTS.items()})
                for part, (variant_model, params) in variants.items():
                    scored = stf.compare(
                        cube, methods={"biastf": {"method": "biastf", **params}}, targets=targets,
                        models={"biastf": variant_model}, data_range=data_range, figures=False,
                    )
                    ablations[part] = _scores(scored)["biastf"]
            variant = f", {json.dumps(biastf_config, sort_keys=True)}" if method == "biastf" and biastf_config else ""
            label = f"{method} (seed {seed}{variant})"
            record["runs"][label] = {
                "method": method,
                "seed": seed,
                "train_s": train_s,
                "validation": model.extra.get("validation"),
                "ablations": ablations,
                **_scores(result)[method],
            }
            echo(
                f"[{name}] {label}: trained in {train_s:.1f} s, mean RMSE {np.mean(record['runs'][label]['rmse']):.5f}"
            )
            if save is not None:
                save(record)
    return record


#: other inference parameters (the fusion ``f``'s weights, the fade), scored on the same trained model
INFERENCE_VARIANTS: dict[str, dict[str, Any]] = {
    "f by similarity to C(k)": {"weights": "similarity"},
    "no fade beyond L": {"extrapolate": True},
    "f weights 1/S": {"weights": "change", "weight_power": 1.0},
    "f weights 1/S^2": {"weights": "change", "weight_power": 2.0},
    "f variance weights, power 0.75": {"weight_power": 0.75},
    "f variance weights, power 1": {"weight_power": 1.0},
    "one orientation": {"self_ensemble": 1},
    "self-ensemble of 8 orientations": {"self_ensemble": 8},
}


def biastf_ablations(model: Any) -> dict[str, Any]:
    """The trained BiaSTF ``model`` with one part removed: ``"B = 0"`` (the bias network's
    parameters zeroed, so it outputs 0 and the prediction is ``F(j) + G`` fused) and, where the
    model has a validated shrink, ``"shrink = 1"`` (the correction applied in full) and
    ``"shrink per part"`` (``G - base`` and ``B`` scaled by their own validated factors); of an
    ensemble, ``"member m alone"`` for each member."""
    import dataclasses

    import jax
    import numpy as np

    params = model.params
    members = int(model.extra.get("members", 1))
    variants = {"B = 0": {**params, "B": jax.tree_util.tree_map(np.zeros_like, params["B"])}}
    if "shrink" in params:
        variants["shrink = 1"] = {**params, "shrink": np.ones_like(params["shrink"])}
    parts = (model.extra.get("validation") or {}).get("shrink_parts")
    if parts is not None and "shrink" in params and members == 1:
        g_part, b_part = np.asarray(parts, np.float32)
        variants["shrink per part"] = {**params, "shrink": g_part, "shrink_b": b_part}
    out = {name: dataclasses.replace(model, params=p) for name, p in variants.items()}
    if members > 1:  # what the ensemble buys over each of its members
        for m in range(members):
            alone = jax.tree_util.tree_map(lambda leaf, m=m: np.asarray(leaf)[m], params)
            out[f"member {m} alone"] = dataclasses.replace(model, params=alone, extra={**model.extra, "members": 1})
    return out


def _wins(runs: dict[str, dict[str, Any]], label: str) -> int:
    """Target dates on which ``label`` has the lowest RMSE among the other methods' runs (the
    same seed's runs of other learned methods, all classical runs)."""
    mine = runs[label]
    others = [
        r
        for k, r in runs.items()
        if r["method"] != mine["method"] and ("seed" not in r or "seed" not in mine or r["seed"] == mine["seed"])
    ]
    return sum(all(v < o["rmse"][i] for o in others) for i, v in enumerate(mine["rmse"]))


def render(records: list[dict[str, Any]], command: str) -> str:
    """The Markdown page: one table per scene."""
    import numpy as np

    lines = [
        "# Study: BiaSTF against its peers",
        "",
        "Every method through `stf.compare` with its defaults; STFDCNN and BiaSTF trained by `stf.train` with no",
        "configuration (sized to the device, validation on a held-out training date per member, early stopping,",
        "refit on all dates), once per training seed. Mean over bands and target dates; SSIM at the truth's band",
        "range. A date is won when the run's RMSE is the lowest of all methods (learned peers of the same seed).",
        "A scene lists the runs that finished; `docs/methods/biastf.md` says which were cut short and why.",
        "The records are the JSON files beside this page (`docs/study/`); the page is rendered from them with:",
        "",
        f"    {command}",
        "",
    ]
    for record in records:
        runs = record["runs"]
        lines += [
            f"## {record['scene']}",
            "",
            f"{record['about']}. Targets: {', '.join(record['targets'])}.",
            "",
            "| method | mean RMSE | mean SSIM | dates won (RMSE) | training (s) | machine |",
            "|---|---|---|---|---|---|",
        ]
        best_rmse = min(np.mean(r["rmse"]) for r in runs.values())
        best_ssim = max(np.mean(r["ssim"]) for r in runs.values())
        for label, r in runs.items():
            rmse, ssim = float(np.mean(r["rmse"])), float(np.mean(r["ssim"]))
            rmse_s = f"**{rmse:.5f}**" if rmse == best_rmse else f"{rmse:.5f}"
            ssim_s = f"**{ssim:.4f}**" if ssim == best_ssim else f"{ssim:.4f}"
            train = f"{r['train_s']:.0f}" if "train_s" in r else ""
            lines.append(
                f"| {label} | {rmse_s} | {ssim_s} | {_wins(runs, label)}/{len(r['rmse'])} | {train} | {r['machine']} |"
            )
        lines.append("")
        estarfm = runs.get("estarfm")
        if estarfm:
            for label, r in runs.items():
                if r["method"] == "biastf":
                    gain = 1 - np.mean(r["rmse"]) / np.mean(estarfm["rmse"])
                    lines.append(
                        f"- {label}: mean RMSE {100 * gain:.1f} % lower than ESTARFM's"
                        if gain >= 0
                        else f"- {label}: mean RMSE {-100 * gain:.1f} % higher than ESTARFM's"
                    )
        for label, r in runs.items():
            if r.get("ablations"):
                parts = "; ".join(
                    f"{part}: {np.mean(a['rmse']):.5f} / {np.mean(a['ssim']):.4f} "
                    f"({_wins({**runs, label: {**r, 'rmse': a['rmse']}}, label)}/{len(a['rmse'])})"
                    for part, a in r["ablations"].items()
                )
                lines.append(
                    f"- {label}, the same model with a part removed or changed (mean RMSE / SSIM, dates won): {parts}"
                )
        for method, message in record.get("failed", {}).items():
            lines.append(f"- {method} did not run with its defaults: {message}")
        lines.append("")
        lines.append(
            "Per date (RMSE): "
            + "; ".join(f"{label}: " + ", ".join(f"{v:.4f}" for v in r["rmse"]) for label, r in runs.items())
        )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stf bench biastf study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", default=",".join(SCENES), help=f"comma-separated, of {list(SCENES)}")
    parser.add_argument("--seeds", default="0,1", help="training seeds of the learned methods (default 0,1)")
    parser.add_argument("--methods", default=",".join(CLASSICAL + LEARNED))
    parser.add_argument("--out", default="out/study", help="folder of the per-scene JSON files")
    parser.add_argument("--doc", default=None, help="write the Markdown page here (e.g. docs/study.md)")
    parser.add_argument("--render-only", action="store_true", help="only render the JSON files in --out")
    parser.add_argument("--size", type=int, default=None, help="shrink the synthetic scenes (quick checks only)")
    parser.add_argument("--preset", default=None, help="config preset of the learned methods (quick checks only)")
    parser.add_argument(
        "--biastf-config", default=None, help='JSON merged into BiaSTF\'s config, e.g. \'{"g_base": "linear"}\''
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.render_only:
        for name in args.scenes.split(","):
            seeds = [int(s) for s in args.seeds.split(",")]
            path = out / f"study_{name}.json"
            run_scene(
                name,
                seeds,
                args.methods.split(","),
                size=args.size,
                preset=args.preset,
                biastf_config=json.loads(args.biastf_config) if args.biastf_config else None,
                save=lambda record, path=path: path.write_text(json.dumps(record, indent=1)),
            )
    if args.doc:
        records: dict[str, dict[str, Any]] = {}
        for path in sorted(out.rglob("study_*.json")):  # runs of one scene may come from several folders
            record = json.loads(path.read_text())
            merged = records.setdefault(record["scene"], {**record, "runs": {}, "failed": {}})
            machine = machine_label(record.get("machine", {}))
            merged["runs"].update({label: {**run, "machine": machine} for label, run in record["runs"].items()})
            merged["failed"].update(record.get("failed", {}))
        order = list(SCENES)
        ordered = sorted(records.values(), key=lambda r: order.index(r["scene"]) if r["scene"] in order else len(order))
        for record in ordered:  # classical methods first, then the learned ones by seed
            record["runs"] = dict(
                sorted(record["runs"].items(), key=lambda kv: ("seed" in kv[1], kv[1].get("seed", 0), kv[0]))
            )
        command = f"stf bench biastf study --render-only --out {args.out} --doc {args.doc}"
        Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
        Path(args.doc).write_text(render(ordered, command))
        print(f"wrote {args.doc} from {len(ordered)} scene(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
