"""Best-of-N sampling time: one shared prefix KV cache vs the prefix recomputed for every candidate.

    python bench/pi0_sampling.py [--ns 1 8 32] [--repeats 3]

A model the size of the openpi_pi0_tiny fixture (three 224² cameras → 768 image tokens, 48 prompt tokens, horizon 10,
action dim 32, 10 Euler steps). "recomputed" is what openpi's `sample_actions` does when called on N copies of an
observation: the VLM runs over the prefix N times. "shared" runs it once and broadcasts its cache to all N candidates.
The last line is the speed-up at the largest N.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from common import pi0  # noqa: E402

CONFIG = pi0.Pi0Config(
    vlm=pi0.GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    expert=pi0.GemmaConfig(width=48, depth=4, mlp_dim=96, num_heads=8, num_kv_heads=1, head_dim=16),
    vit=pi0.SigLIPConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=224),
    vocab_size=1024,
    action_dim=32,
    action_horizon=10,
    max_token_len=48,
)


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = pi0.Pi0(CONFIG)
    params = model.init(jax.random.key(0))
    obs = model.dummy_observation(1)
    obs = obs.replace(
        images={k: jax.random.uniform(jax.random.key(1), v.shape, minval=-1) for k, v in obs.images.items()}
    )
    H, A = CONFIG.action_horizon, CONFIG.action_dim

    @jax.jit
    def shared(params, obs, noise):  # noise [1,N,H,A]: one VLM pass, N candidates over its cache
        return model.sample(params, model.prefix(params, obs), noise, args.steps)

    @jax.jit
    def recomputed(params, obs, noise):  # N copies of the observation, each with its own VLM pass
        n = noise.shape[1]
        tiled = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), obs)
        return model.sample(params, model.prefix(params, tiled), noise.reshape(n, 1, H, A), args.steps)

    print(
        f"π₀ of the pi0 fixture's size ({pi0.param_count(params):,} params), 3×224² cameras, "
        f"{CONFIG.max_token_len} tokens, {args.steps} steps, {jax.devices()[0].platform}"
    )
    print(f"{'N':>4} {'shared cache (ms)':>18} {'recomputed (ms)':>16} {'speed-up':>9}")
    ratio = 0.0
    for n in args.ns:
        noise = jax.random.normal(jax.random.key(2), (1, n, H, A))
        t_shared = timed(shared, params, obs, noise, repeats=args.repeats)
        t_rec = timed(recomputed, params, obs, noise, repeats=args.repeats)
        ratio = t_rec / t_shared
        print(f"{n:>4} {t_shared * 1e3:>18.1f} {t_rec * 1e3:>16.1f} {ratio:>8.1f}x", flush=True)
    print(f"speed-up of the shared prefix cache at N={args.ns[-1]}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
