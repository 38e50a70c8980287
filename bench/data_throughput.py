"""Data pipeline throughput: push dataset generation, and chunk transitions sampled per second.

python bench/data_throughput.py                 # full: 1000 episodes, batch 256
python bench/data_throughput.py --episodes 100  # quick
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import ReplayBuffer, load_episodes, make_chunks  # noqa: E402
from common.envs import PUSH_PROMPTS, PushDemonstrator, PushEnv, execute_chunk, make_dataset  # noqa: E402


def rate(fn, items: int, seconds: float = 2.0) -> float:
    """Items per second of `fn` (called repeatedly for about `seconds`)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n * items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=5)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for size in (0, 64):
            path = f"{tmp}/push_{size}.h5"
            start = time.perf_counter()
            make_dataset(path, episodes=args.episodes, noise=0.6, image_size=size)
            rows.append(
                (f"generate {args.episodes} push episodes, image {size}", f"{time.perf_counter() - start:.2f} s")
            )
            start = time.perf_counter()
            data = load_episodes(path, prompts=PUSH_PROMPTS)
            chunks = make_chunks(data, args.horizon, 0.99)
            rows.append((f"load + chunk ({len(chunks)} chunks), image {size}", f"{time.perf_counter() - start:.2f} s"))
            per_s = rate(lambda c=chunks: c.sample(rng, args.batch), args.batch)
            rows.append((f"ChunkDataset.sample, batch {args.batch}, image {size}", f"{per_s:,.0f} chunks/s"))

            env = PushEnv(64, image_size=size, seed=1)
            buffer = ReplayBuffer(100_000, args.horizon, 0.99)
            obs, expert = env.reset()[0], PushDemonstrator(0.6, seed=2)
            start, steps = time.perf_counter(), 0
            while len(buffer) < 20_000:
                actions = np.stack([expert.act(obs)] * args.horizon, 1)  # one action held for the chunk
                next_obs, step = execute_chunk(env, obs, actions, 0.99)
                buffer.add(step, {"obs_state": obs["state"]})  # what a script caches when it acts
                obs, steps = next_obs, steps + step.valid.sum()
            rows.append(
                (
                    f"execute_chunk + add (64 envs), image {size}",
                    f"{steps / (time.perf_counter() - start):,.0f} env steps/s",
                )
            )
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  measured\n{'-' * width}  --------")
    for what, value in rows:
        print(f"{what:<{width}}  {value}")


if __name__ == "__main__":
    main()
