"""``stf bench biastf``: BiaSTF training throughput and whole-scene inference time.

Training
    Patches per second of the full training step (seeded draws, on-device crops, batch building,
    forward, backward, Adam) of stage 1 (``G``) and stage 2 (``B``), the latter running the frozen
    ``G`` on every batch and, as training does by default, cropping ``G``'s output computed once
    over the scene (``"B, frozen G"``; ``frozen_g_s``: the seconds of that pass), for per-band
    (the paper: one network per band) and multiband networks, float32
    (device default precision: TF32 on NVIDIA GPUs) and bfloat16. Timed after a compiling warm-up.
Inference
    One ``size x size`` scene, all bands, both directions (``G`` then ``B`` for each pair, then
    the fusion), with the paper's networks (random weights: speed does not depend on them):
    ``compute`` on device-resident inputs, beside ``floor``, the bare forward passes of the same
    networks on inputs of the same size (:func:`forward_floor`), and ``kernel`` through the engine kernel from NumPy
    (host transfers included), for dtypes float32 (full precision), tensorfloat32 (the default) and
    bfloat16,
    plus the change of the prediction against float32 (max and RMS absolute difference).
Zarr to Zarr
    ``stf.fuse`` of one target of a ``size x size`` cube stored in Zarr, written to Zarr
    (``--zarr``), as the engine runs it by default (on a GPU: the scene as one block assembled on
    the device, ``stf_pipeline.parallel.map_on_device``) and, side by side, with the cube's chunks as
    overlapping blocks (``STF_DEVICE_BLOCK_PIXELS=0``; keys ``<dtype>_chunks_...``): the first run
    (which compiles) and the best of ``--repeats``.

Speed does not depend on pixel values, so the scenes are smooth random reflectance (3 dates,
6 bands, ``coarse_factor`` 20, no CRS). Prints a table; writes JSON with the machine description, rewritten
after every row so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import best_wall_time, describe_machine

BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")


def scene(size: int, *, n_times: int = 3, seed: int = 0) -> Any:
    """A ``size x size`` NumPy cube of smooth random reflectance, 6 bands, ``coarse_factor`` 20."""
    import numpy as np

    from stf_pipeline.cube import make_cube

    rng = np.random.default_rng(seed)
    small = rng.uniform(0.02, 0.5, (2, n_times, len(BANDS), size // 20 + 1, size // 20 + 1)).astype(np.float32)
    fine, coarse = np.repeat(np.repeat(small, 20, axis=3), 20, axis=4)[..., :size, :size]
    fine = fine + rng.normal(0, 0.01, fine.shape).astype(np.float32)
    centres = (np.arange(size) + 0.5) * 25.0
    times = np.datetime64("2020-01-01") + np.arange(n_times) * np.timedelta64(16, "D")
    return make_cube(fine, coarse, time=list(times), band=BANDS, y=centres[::-1].copy(), x=centres, coarse_factor=20)


def _config(args: argparse.Namespace, *, multiband: bool, dtype: str) -> Any:
    from stf_pipeline.methods.biastf import BiaSTFConfig

    train = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "patch_size": args.patch_size,
        "progress": False,
        "log_every": args.steps,
        "checkpoint_every": args.steps,
    }
    return BiaSTFConfig.resolve(
        {"filters": [args.filters] * 3, "multiband": multiband, "train_dtype": dtype, "train": train}
    )


def _training(args: argparse.Namespace, rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    import functools

    import jax
    import jax.numpy as jnp

    from stf_pipeline.methods import biastf
    from stf_pipeline.nn import PatchSampler, create_train_state, ordered_pairs
    from stf_pipeline.nn.train import sample_step

    cube = scene(args.train_size, n_times=4, seed=1)
    for multiband in args.layouts:
        for dtype in ("float32", "bfloat16"):
            cfg = _config(args, multiband=multiband, dtype=dtype)
            tc = cfg.stage1
            g_model, b_model = biastf.make_networks(cfg, len(BANDS), dtype)
            sampler = PatchSampler(
                cube, cube.time.values, items=ordered_pairs(4), patch_size=tc.patch_size, batch_size=tc.batch_size
            )
            sample = jnp.zeros((1, tc.patch_size, tc.patch_size, len(BANDS), len(cfg.g_inputs)))
            g_state = create_train_state(jax.random.key(0), tc, g_model, sample, loss=cfg.g_loss)
            sample_b = jnp.zeros((1, tc.patch_size, tc.patch_size, len(BANDS), len(cfg.b_inputs)))
            b_state = create_train_state(jax.random.key(1), tc, b_model, sample_b, loss=cfg.b_loss)
            stats = biastf.fit_statistics(cube, cube.time.values, 20)
            start = time.perf_counter()
            outputs = biastf.frozen_g_outputs(
                g_model, g_state.params, cube.fine.values, cube.coarse.values, ordered_pairs(4), cfg, stats
            )
            jax.block_until_ready(outputs)
            frozen_s = time.perf_counter() - start
            frozen = PatchSampler(
                cube, cube.time.values, items=ordered_pairs(4), patch_size=tc.patch_size, batch_size=tc.batch_size,
                per_item={"change_pred": outputs},
            )
            b_make = functools.partial(biastf.b_batch, config=cfg, stats=stats, g_model=g_model)
            stages = (
                ("G", g_state, functools.partial(biastf.g_batch, config=cfg, stats=stats), None, sampler),
                ("B", b_state, b_make, g_state.params, sampler),
                ("B, frozen G", b_state, b_make, g_state.params, frozen),
            )
            for stage, state, make_batch, aux, sampler in stages:
                for step in range(2):  # compile
                    state, metrics = sample_step(state, sampler.crops(step), aux, make_batch=make_batch)
                jax.block_until_ready(state.params)
                start = time.perf_counter()
                for step in range(args.steps):
                    state, metrics = sample_step(state, sampler.crops(step), aux, make_batch=make_batch)
                jax.block_until_ready((state.params, metrics))
                seconds = time.perf_counter() - start
                rows.append(
                    {
                        "stage": stage,
                        "layout": "multiband" if multiband else "per-band",
                        "dtype": dtype,
                        "batch": tc.batch_size,
                        "patch": tc.patch_size,
                        "patches_per_s": args.steps * tc.batch_size / seconds,
                        "step_ms": 1e3 * seconds / args.steps,
                        **({"frozen_g_s": frozen_s} if stage == "B, frozen G" else {}),
                    }
                )
                print(f"  train {rows[-1]}", flush=True)
                save()


def random_model(args: argparse.Namespace, multiband: bool) -> Any:
    """A BiaSTF model of six bands with random (not zero) weights, sized by ``args.filters``; tests use it too."""
    import jax
    import jax.numpy as jnp

    from stf_pipeline.methods import biastf
    from stf_pipeline.nn import FittedModel

    cfg = _config(args, multiband=multiband, dtype="float32")
    # non-zero last layers (trained networks are not zero), so the dtypes' outputs differ as they would
    g_model, b_model = (net.clone(zero_last=False) for net in biastf.make_networks(cfg, len(BANDS), "float32"))
    params = {}
    for i, (name, model, inputs) in enumerate((("G", g_model, cfg.g_inputs), ("B", b_model, cfg.b_inputs))):
        sample = jnp.zeros((1, 16, 16, len(BANDS), len(inputs)))
        params[name] = jax.device_get(jax.jit(model.init)(jax.random.key(i), sample)["params"])
    # as training records it on the benchmark's block-resampled scenes: the networks see the coarse images interpolated
    interpolated = cfg.coarse_interpolation == "cubic"
    return FittedModel("biastf", cfg.to_dict(), params, BANDS, 20, extra={"coarse_interpolated": interpolated})


def forward_floor(model: Any, dtype: str, views: int, size: int, repeats: int) -> float:
    """Seconds of the bare forward passes inference cannot avoid: ``G`` and ``B`` of ``model`` on both
    directions' ``size x size`` inputs, ``views`` orientations each, at ``dtype``, on device-resident
    arrays; no halo, no statistics, no masks, no fusion (issue 18's floor for the inference kernel)."""
    import jax
    import jax.numpy as jnp

    from stf_pipeline.methods import biastf

    cfg = biastf.BiaSTFConfig.resolve(model.config)
    g_net, b_net = biastf.make_networks(cfg, len(BANDS), dtype)
    precision = "highest" if dtype == "float32" else "default"
    keys = jax.random.split(jax.random.key(7), 2)
    g_in, b_in = (
        jax.random.uniform(key, (2, size, size, len(BANDS), len(inputs)), jnp.float32)
        for key, inputs in zip(keys, (cfg.g_inputs, cfg.b_inputs), strict=True)
    )

    def oriented(x: Any, view: int) -> Any:  # distinct inputs per view, so XLA cannot share the passes
        x = jnp.flip(x, 1) if view & 1 else x
        x = jnp.flip(x, 2) if view & 2 else x
        return jnp.swapaxes(x, 1, 2) if view & 4 else x

    @jax.jit
    def passes(params: Any, g_in: Any, b_in: Any) -> Any:
        with jax.default_matmul_precision(precision):
            outs = [
                (g_net.apply({"params": params["G"]}, oriented(g_in, v)),
                 b_net.apply({"params": params["B"]}, oriented(b_in, v)))
                for v in range(views)
            ]
        return sum(g.sum() + b.sum() for g, b in outs)

    device_params = jax.device_put(model.params)
    jax.block_until_ready(passes(device_params, g_in, b_in))
    return best_wall_time(lambda: jax.block_until_ready(passes(device_params, g_in, b_in)), repeats)


def _inference(args: argparse.Namespace, rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    import jax
    import numpy as np

    from stf_pipeline.methods import biastf

    cube = scene(args.size, seed=2)
    fine, coarse, target = cube.fine.values[[0, 2]], cube.coarse.values[[0, 2]], cube.coarse.values[1]
    on_device = [jax.device_put(a) for a in (fine, coarse, target)]
    for multiband in args.layouts:
        model = random_model(args, multiband)
        references: dict[int, Any] = {}  # float32's output per self-ensemble
        for views, dtype in itertools.product(args.self_ensembles, biastf.DTYPES):
            params = biastf.BiaSTFParams(window=21, dtype=dtype, self_ensemble=views)
            window, spread = params.windows(model.coarse_factor)
            predict = biastf.predictor(  # the program biastf_kernel runs for this model and params
                json.dumps(model.config, sort_keys=True), len(BANDS), dtype, window, params.eps, params.weights,
                power=params.power, self_ensemble=views, spread_window=spread,
                interpolate=biastf.interpolation_factor(model),
            )
            device_params = jax.device_put(model.params)
            stats = jax.device_put(biastf.Statistics.identity(len(BANDS)).arrays())
            row: dict[str, Any] = {
                "layout": "multiband" if multiband else "per-band", "dtype": dtype, "self_ensemble": views,
                "size": args.size,
            }
            try:
                jax.block_until_ready(predict(device_params, stats, *on_device))
                # best_wall_time calls the lambdas right away, within this iteration
                row["compute_s"] = best_wall_time(
                    lambda: jax.block_until_ready(predict(device_params, stats, *on_device)[0]),  # noqa: B023
                    args.repeats,
                )
                row["floor_s"] = forward_floor(model, dtype, views, args.size, args.repeats)
                row["compute_over_floor"] = row["compute_s"] / row["floor_s"]
                out: list[Any] = []
                row["kernel_s"] = best_wall_time(
                    lambda: out.append(  # noqa: B023
                        biastf.biastf_kernel(fine, coarse, target, params=params, model=model)  # noqa: B023
                    ),
                    args.repeats,
                )
            except Exception as err:  # out of device memory on a small device: report, go on
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                rows.append(row)
                print(f"  infer {row}", flush=True)
                save()
                continue
            reference = references.setdefault(views, out[-1])
            diff = np.abs(out[-1] - reference)
            row["max_abs_vs_float32"] = float(np.nanmax(diff))
            row["rms_vs_float32"] = float(np.sqrt(np.nanmean(diff**2)))
            rows.append(row)
            print(f"  infer {row}", flush=True)
            save()


def _zarr(args: argparse.Namespace) -> dict[str, Any]:
    import stf_pipeline as stf
    from stf_pipeline.methods import biastf
    from stf_pipeline.parallel import DEVICE_BLOCK_VARIABLE

    model = random_model(args, args.zarr_multiband)
    cube = scene(args.size, seed=3)
    asked = os.environ.get(DEVICE_BLOCK_VARIABLE)
    # the engine's default, then the cube's chunks as blocks (``STF_DEVICE_BLOCK_PIXELS=0``), side by side
    modes = {"": asked, "chunks_": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        src = stf.write_cube(cube, Path(tmp) / "in.zarr", chunks={"y": args.chunk, "x": args.chunk})
        rows: dict[str, list[float]] = {}
        try:
            for dtype, (mode, setting) in itertools.product(biastf.DTYPES, modes.items()):
                os.environ.pop(DEVICE_BLOCK_VARIABLE, None)
                if setting is not None:
                    os.environ[DEVICE_BLOCK_VARIABLE] = setting
                for _ in range(max(args.repeats, 1)):
                    start = time.perf_counter()
                    pred = stf.fuse(
                        stf.open_cube(src), cube.time.values[1], method="biastf", model=model, dtype=dtype
                    )
                    out = pred.to_dataset()
                    for var in out.variables.values():
                        var.encoding = {}
                    out.to_zarr(Path(tmp) / f"out-{dtype}.zarr", mode="w", zarr_format=2)
                    rows.setdefault(f"{dtype}_{mode}", []).append(time.perf_counter() - start)
        finally:
            os.environ.pop(DEVICE_BLOCK_VARIABLE, None)
            if asked is not None:
                os.environ[DEVICE_BLOCK_VARIABLE] = asked
    result: dict[str, Any] = {
        "size": args.size, "chunk": args.chunk, "layout": "multiband" if args.zarr_multiband else "per-band"
    }
    for name, seconds in rows.items():
        result[f"{name}first_s"], result[f"{name}best_s"] = seconds[0], min(seconds)
    print(f"  zarr {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """``stf bench biastf [ARGS]`` runs the benchmark (see the module docstring) and returns 0;
    ``stf bench biastf study [ARGS]`` runs the accuracy study (:mod:`benchmarks._biastf_study`)."""
    import sys

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["study"]:
        from benchmarks import _biastf_study

        return _biastf_study.main(args_in[1:])
    parser = argparse.ArgumentParser(prog="stf bench biastf", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gpu", action="store_true", help="require a GPU and use the paper's sizes (default: small CPU sizes)"
    )
    parser.add_argument("--size", type=int, help="inference scene side (default 2000 with --gpu, 256 without)")
    parser.add_argument("--train-size", type=int, default=None, help="side of the training scene (default 512 / 128)")
    parser.add_argument("--filters", type=int, help="n1 = n2 = n3 (default 128 / 16)")
    parser.add_argument("--batch-size", type=int, help="patches per step (default 64 / 8)")
    parser.add_argument("--patch-size", type=int, help="patch side (default 128 / 32)")
    parser.add_argument("--steps", type=int, help="timed training steps (default 20 / 3)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="inference and Zarr repeats (best is reported; Zarr also the first)"
    )
    parser.add_argument("--layouts", default="per-band,multiband", help="comma-separated: per-band, multiband")
    parser.add_argument(
        "--self-ensembles", default="1,4", help="comma-separated orientations per pass (BiaSTFParams.self_ensemble)"
    )
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train, infer, zarr")
    parser.add_argument("--chunk", type=int, default=1024, help="Zarr chunk side for the Zarr-to-Zarr run")
    parser.add_argument(
        "--zarr-per-band", action="store_true", help="Zarr-to-Zarr with per-band networks (default multiband)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench_biastf.json"), help="where to write the results")
    args = parser.parse_args(argv)
    import jax

    if args.gpu and jax.default_backend() != "gpu":
        parser.error(f"--gpu given but JAX runs on {jax.default_backend()!r}; install jax[cuda12] or drop --gpu.")
    big = args.gpu
    args.size = args.size or (2000 if big else 256)
    args.train_size = args.train_size or (512 if big else 128)
    args.filters = args.filters or (128 if big else 16)
    args.batch_size = args.batch_size or (64 if big else 8)
    args.patch_size = args.patch_size or (128 if big else 32)
    args.steps = args.steps or (20 if big else 3)
    args.layouts = [
        {"per-band": False, "multiband": True}[name.strip()] for name in args.layouts.split(",") if name.strip()
    ]
    args.self_ensembles = [int(v) for v in args.self_ensembles.split(",") if v.strip()]
    args.zarr_multiband = not args.zarr_per_band
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    info = describe_machine()
    print(f"machine: {info}", flush=True)
    results: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "json"}}

    def save() -> None:  # after every row: a run cut short (a time limit) keeps what it measured
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))

    if "train" not in skip:
        _training(args, results.setdefault("training", []), save)
    if "infer" not in skip:
        _inference(args, results.setdefault("inference", []), save)
    if "zarr" not in skip:
        results["zarr"] = _zarr(args)
    print("\nBiaSTF benchmark")
    for row in results.get("training", []):
        print(
            f"  train stage {row['stage']} {row['layout']:>9} {row['dtype']:>8}: {row['patches_per_s']:9.1f} patches/s "
            f"(batch {row['batch']}, {row['patch']}^2, {row['step_ms']:.1f} ms/step)"
        )
    for row in results.get("inference", []):
        if "error" in row:
            print(f"  infer {row['layout']:>9} {row['dtype']:>13}: {row['error']}")
            continue
        print(
            f"  infer {row['layout']:>9} {row['dtype']:>13} x{row['self_ensemble']} {row['size']}^2 x 6, "
            "both directions: "
            f"compute {row['compute_s']:.3f} s (bare forward {row['floor_s']:.3f} s, "
            f"ratio {row['compute_over_floor']:.2f}), kernel from NumPy {row['kernel_s']:.3f} s, "
            f"vs float32 max {row['max_abs_vs_float32']:.2e} rms {row['rms_vs_float32']:.2e}"
        )
    if "zarr" in results:
        z = results["zarr"]
        times = ", ".join(
            f"{key[:-2].replace('_', ' ')} {value:.2f} s" for key, value in z.items() if key.endswith("_s")
        )
        print(f"  zarr->zarr {z['size']}^2 x 6 ({z['layout']}, chunks {z['chunk']}): {times}")
    save()
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
