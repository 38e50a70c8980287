"""The package's command line: `python -m common make-dataset ...` writes a task's demonstrator or oracle episodes
(push: HDF5 in the robomimic layout; ogbench:<id>: OGBench's npz), the prior data the scripts read with --dataset."""

from __future__ import annotations

import argparse
import time

import h5py

from common import envs, gymenv


def main(argv: list[str] | None = None) -> None:
    """`python -m common make-dataset --env push|ogbench:<id> --out FILE [--episodes N --noise X ...]`."""
    parser = argparse.ArgumentParser(prog="python -m common")
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-dataset", help="write demonstrator episodes (push: HDF5; ogbench:<id>: OGBench's npz)")
    mk.add_argument(
        "--env", default="push", help="push, or ogbench:<OGBench id> (e.g. cube-single-singletask-task1-v0)"
    )
    mk.add_argument("--episodes", type=int, default=1000)
    noise_help = "push: action noise std, or 'mixed' (0.3/0.6/1.0 in equal parts), default 0.6; OGBench: the recipe's "
    mk.add_argument("--noise", default=None, help=noise_help + "noise level, default 0.1 (OGBench's)")
    mk.add_argument("--out", required=True)
    mk.add_argument("--image-size", type=int, default=0)
    mk.add_argument("--seed", type=int, default=0)
    gymenv.add_ogbench_flags(mk)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        noise = args.noise if args.noise == "mixed" else float(args.noise or (0.1 if "ogbench:" in args.env else 0.6))
    except ValueError:
        raise SystemExit(f"--noise {args.noise}: a number ≥ 0 (push also takes 'mixed')") from None
    if args.episodes < 1:
        raise SystemExit(f"--episodes {args.episodes}: out of range (≥ 1)")
    if noise != "mixed" and noise < 0:
        raise SystemExit(f"--noise {args.noise}: out of range (≥ 0)")
    if args.env.startswith("ogbench:"):
        return gymenv.write_ogbench_dataset(args, noise)
    path = envs.make_dataset(args.out, args.env, args.episodes, noise, seed=args.seed, image_size=args.image_size)
    with h5py.File(path, "r") as f:
        rate, total = f["data"].attrs["success_rate"], f["data"].attrs["total"]
    print(f"{args.episodes} episodes, {total} steps, demonstrator success {rate:.1%}, {time.time() - start:.1f}s")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
