"""``stf bench stfdcnn``: STFDCNN training throughput (patches/s) and inference time of one scene.

Training: the shared :func:`stf_pipeline.nn.fit` loop (seeded patch draws, on-device crops,
jitted step), timed after a compiling warm-up run, for each stage (the NLM
CNN on LSR patches, the SR CNN on fine patches). Speed does not depend on the pixel values, so
the scenes are uniform random reflectance (three dates, six bands, ``coarse_factor`` 16: LSR
factor 4, no CRS so that GPU workers need no GDAL), quick to build at any size. Inference: the jitted
two-level prediction (:func:`stf_pipeline.methods.stfdcnn.predict_block`) of a ``size x size`` scene with the paper's
architecture (weights random: speed does not depend on them), timed after a warm-up on
device-resident inputs ("compute"), and end to end through ``stf.fuse`` on a NumPy-backed cube
(host transfers included). Prints a table and writes JSON with the machine description.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from benchmarks._common import best_wall_time, describe_machine


def scene(size: int, *, seed: int = 0) -> Any:
    """A ``size x size`` cube of uniform random reflectance: 3 dates, 6 bands, ``coarse_factor`` 16."""
    import numpy as np

    from stf_pipeline.cube import make_cube
    from stf_pipeline.testing import BANDS6

    rng = np.random.default_rng(seed)
    fine, coarse = (rng.uniform(0.02, 0.5, (3, len(BANDS6), size, size)).astype(np.float32) for _ in range(2))
    centres = (np.arange(size) + 0.5) * 30.0
    times = np.datetime64("2020-01-01") + np.arange(3) * np.timedelta64(16, "D")
    return make_cube(fine, coarse, time=list(times), band=BANDS6, y=centres[::-1].copy(), x=centres, coarse_factor=16)


def _training(args: argparse.Namespace) -> list[dict[str, Any]]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    from stf_pipeline.methods import stfdcnn
    from stf_pipeline.nn import PatchSampler, TrainConfig, create_train_state, fit
    from stf_pipeline.nn.stfdcnn_modules import ResidualCNN

    cube = scene(args.train_size)
    times = cube.time.values
    factor = int(cube.attrs["coarse_factor"])
    r = stfdcnn.default_lsr_factor(factor)
    cfg = stfdcnn.STFDCNNConfig.resolve(None)
    n_bands = cube.sizes["band"]
    rows = []
    stages = (
        (
            "stage1_nlm",
            cfg.nlm,
            stfdcnn.NLMBatch(r, cfg.nlm.receptive_radius),
            ("fine", "coarse"),
            args.patch_size // r,
        ),
        ("stage2_sr", cfg.sr, stfdcnn.SRBatch(r, cfg.sr.receptive_radius), ("fine",), args.patch_size),
    )
    for name, net_cfg, make_batch, variables, size in stages:
        train = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, patch_size=args.patch_size, warmup_steps=0,
            log_every=args.steps, checkpoint_every=args.steps, progress=False,
        )
        sampler = PatchSampler(
            cube, times, items=[(i,) for i in range(len(times))], patch_size=args.patch_size,
            batch_size=args.batch_size, align=r, variables=variables,
        )
        state = create_train_state(jax.random.key(0), train, ResidualCNN(n_bands=n_bands, config=net_cfg),
                                   jnp.zeros((1, size, size, n_bands, 1)))

        def run(steps: int, train: TrainConfig = train, state: Any = state, sampler: PatchSampler = sampler,
                make_batch: Any = make_batch) -> None:
            result = fit(state, sampler, make_batch, config=dataclasses.replace(train, steps=steps, log_every=steps))
            jax.block_until_ready(result.params)

        run(2)  # compile
        seconds = best_wall_time(functools.partial(run, args.steps), 1)
        rows.append({
            "stage": name, "patch": args.patch_size, "batch": args.batch_size, "steps": args.steps,
            "seconds": seconds, "patches_per_s": args.steps * args.batch_size / seconds,
        })
    return rows


def _inference(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import stf_pipeline as stf
    from stf_pipeline.methods import stfdcnn
    from stf_pipeline.nn import FittedModel
    from stf_pipeline.nn.stfdcnn_modules import ResidualCNN

    cube = scene(args.size, seed=1)
    factor = int(cube.attrs["coarse_factor"])
    bands = tuple(cube["band"].values.tolist())
    arch = stfdcnn.Architecture(bands=bands, lsr_factor=stfdcnn.default_lsr_factor(factor), coarse_factor=factor)
    init = jax.jit(ResidualCNN(len(bands), arch.nlm).init)
    params = {name: jax.device_get(init(jax.random.key(i), jnp.zeros((1, 8, 8, len(bands), 1)))["params"])
              for i, name in enumerate(("nlm", "sr"))}
    model = FittedModel(method="stfdcnn", config={"architecture": arch.to_dict()}, params=params, bands=bands,
                        coarse_factor=factor)
    pairs, target = cube.time.values[[0, 2]], cube.time.values[1]
    fine = jnp.asarray(cube.fine.sel(time=list(pairs)).values)
    coarse = jnp.asarray(cube.coarse.sel(time=list(pairs)).values)
    coarse_target = jnp.asarray(cube.coarse.sel(time=target).values)
    device_params = jax.device_put(params)
    rows = []
    for dtype in stfdcnn.COMPUTE_DTYPES:
        p = stfdcnn.STFDCNNParams(compute_dtype=dtype)

        def compute(p: Any = p) -> None:
            out = stfdcnn.predict_block(device_params["nlm"], device_params["sr"], fine, coarse, coarse_target,
                                        arch=arch, params=p)
            out.block_until_ready()

        compute()  # compile
        compute_s = best_wall_time(compute, args.repeats)

        def end_to_end(dtype: str = dtype) -> None:
            np.asarray(stf.fuse(cube, target, method="stfdcnn", model=model, pairs=list(pairs),
                                compute_dtype=dtype).values)

        end_to_end()
        rows.append({
            "scene": f"{args.size}x{args.size}x{len(bands)}", "dtype": dtype, "compute_s": compute_s,
            "fuse_end_to_end_s": best_wall_time(end_to_end, args.repeats),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; see ``stf bench stfdcnn --help``."""
    parser = argparse.ArgumentParser(prog="stf bench stfdcnn", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="inference scene side (fine pixels)")
    parser.add_argument("--train-size", type=int, default=512, help="training scene side (fine pixels)")
    parser.add_argument("--patch-size", type=int, default=128, help="training patch side (fine pixels)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per stage")
    parser.add_argument("--repeats", type=int, default=3, help="timed inference runs (best kept)")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("bench_stfdcnn.json"), help="output JSON path")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "stfdcnn", "machine": describe_machine(), "args": {k: str(v) for k, v in vars(args).items()}
    }
    if not args.skip_training:
        result["training"] = _training(args)
        print(f"{'stage':<12}{'patch':>7}{'batch':>7}{'steps':>7}{'seconds':>10}{'patches/s':>12}")
        for row in result["training"]:
            print(f"{row['stage']:<12}{row['patch']:>7}{row['batch']:>7}{row['steps']:>7}{row['seconds']:>10.3f}"
                  f"{row['patches_per_s']:>12.0f}")
    if not args.skip_inference:
        result["inference"] = _inference(args)
        print(f"{'scene':<16}{'dtype':>10}{'compute s':>12}{'fuse s':>10}")
        for row in result["inference"]:
            print(f"{row['scene']:<16}{row['dtype']:>10}{row['compute_s']:>12.3f}{row['fuse_end_to_end_s']:>10.3f}")
    args.json.write_text(json.dumps(result, indent=1))
    print(f"machine: {result['machine']}")
    return 0
