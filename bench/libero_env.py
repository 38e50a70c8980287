"""LIBERO environment throughput: steps per second with 1, 2 and 4 envs (each in its own process), worker memory,
and the wall time of one evaluation episode driven by the CPU pi0 preset (random init) through
pi0.make_observation -> model.prefix -> model.sample, executed open loop in chunks.

python bench/libero_env.py                                  # 1/2/4 envs at 256^2, one full libero_spatial episode
python bench/libero_env.py --envs 1 --steps 10 --episode-steps 20 --image-size 64   # quick
Needs the `libero` extra (pip install -e ".[libero]") and EGL or OSMesa. Writes bench/results/libero_env.{json,png}.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import envs, libero  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_envs(n: int, args: argparse.Namespace) -> dict:
    """Start n env processes, reset (the first reset builds the simulators), step `args.steps` times at random."""
    start = time.perf_counter()
    env = envs.make_env("libero", n, seed=0, image_size=args.image_size, suite=args.suite)
    build = time.perf_counter() - start
    try:
        start = time.perf_counter()
        env.reset(seed=0)
        reset = time.perf_counter() - start
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(args.steps):
            actions = np.clip(rng.normal(0.0, 0.3, (n, 7)), -1, 1)
            _, _, term, trunc, _ = env.step(actions)
            if (term | trunc).any():
                env.reset_where(term | trunc)
        seconds = time.perf_counter() - start
        memory = [rss_mb(w.proc.pid) for w in env._workers]
    finally:
        env.close()
    return {
        "num_envs": n,
        "steps_per_s": n * args.steps / seconds,
        "steps_per_s_per_env": args.steps / seconds,
        "start_s": build,
        "reset_s": reset,
        "worker_rss_mb": float(np.mean(memory)),
    }


def eval_episode(args: argparse.Namespace) -> dict:
    """One evaluation episode (fixed init state 0 of task 0) with a random-init CPU-preset pi0 policy."""
    import jax

    from common import pi0

    env = envs.make_env(
        "libero",
        1,
        seed=0,
        image_size=args.image_size,
        suite=args.suite,
        task_ids=[0],
        eval_mode=True,
        max_episode_steps=args.episode_steps,
    )
    try:
        cfg = pi0.make_config(
            "cpu", action_dim=env.action_dim, state_dim=env.state_dim, cameras=tuple(env.camera_names)
        )
        model = pi0.Pi0(cfg)
        params = model.init(jax.random.key(0))
        table = pi0.make_prompt_table(env.prompts, pi0.BuiltinTokenizer(cfg.max_token_len, cfg.vocab_size))

        @jax.jit
        def policy(params, obs, rng):  # deterministic: zero initial noise
            prefix = model.prefix(params, pi0.make_observation(cfg, obs, table))
            noise = jax.numpy.zeros((1, 1, cfg.action_horizon, cfg.action_dim))  # B N H A
            return model.sample(params, prefix, noise, 10)[:, 0]  # B H A

        start = time.perf_counter()
        obs, _ = env.reset(seed=0)
        reset = time.perf_counter() - start
        policy(params, obs, None).block_until_ready()  # compile outside the timing
        policy_s, env_s, steps, success = 0.0, 0.0, 0, False
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            actions = np.asarray(policy(params, obs, None))
            t1 = time.perf_counter()
            obs, step = envs.execute_chunk(env, obs, actions, gamma=0.99)
            env_s, policy_s = env_s + time.perf_counter() - t1, policy_s + t1 - t0
            steps += int(step.valid.sum())
            if step.terminated.any() or step.truncated.any():
                success = bool(step.success.any())
                break
        wall = time.perf_counter() - start
    finally:
        env.close()
    return {
        "episode_steps": steps,
        "episode_wall_s": wall,
        "reset_s": reset,
        "policy_s": policy_s,
        "env_s": env_s,
        "success": success,
        "action_horizon": cfg.action_horizon,
    }


def save(result: dict, out: Path) -> None:
    out.mkdir(exist_ok=True, parents=True)
    (out / "libero_env.json").write_text(json.dumps(result, indent=2))
    if result["throughput"]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = [r["num_envs"] for r in result["throughput"]]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(n, [r["steps_per_s"] for r in result["throughput"]], "o-", label="all envs")
        ax.plot(n, [r["steps_per_s_per_env"] for r in result["throughput"]], "s--", label="per env")
        ax.set(xlabel="envs (processes)", ylabel="env steps / s", xticks=n)
        ax.set_title(f"LIBERO {result['suite']}, {result['image_size']}² x 2 cameras, {result['mujoco_gl']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "libero_env.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=30, help="steps per env for the throughput")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--episode-steps", type=int, default=None, help="episode limit (default: the suite's)")
    parser.add_argument("--skip-episode", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for libero_env.{json,png}")
    args = parser.parse_args()
    gl = libero.setup_rendering()
    result = {
        "suite": args.suite,
        "image_size": args.image_size,
        "mujoco_gl": gl,
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "throughput": [],
        "episode": None,
    }
    print(f"LIBERO {args.suite}, two cameras at {args.image_size}², MUJOCO_GL={gl}")
    print(f"{'envs':>4} {'steps/s':>8} {'/env':>7} {'start s':>8} {'1st reset s':>11} {'RSS/env MB':>11}")
    for n in args.envs:
        r = measure_envs(n, args)
        result["throughput"].append(r)
        save(result, args.out)  # partial runs keep what they measured
        print(
            f"{n:>4} {r['steps_per_s']:>8.2f} {r['steps_per_s_per_env']:>7.2f} {r['start_s']:>8.1f} "
            f"{r['reset_s']:>11.1f} {r['worker_rss_mb']:>11.0f}",
            flush=True,
        )
    if not args.skip_episode:
        e = eval_episode(args)
        result["episode"] = e
        save(result, args.out)
        print(
            f"evaluation episode (CPU pi0 preset, random init, H={e['action_horizon']}): {e['episode_steps']} steps "
            f"in {e['episode_wall_s']:.1f}s (policy {e['policy_s']:.1f}s, env {e['env_s']:.1f}s; reset "
            f"{e['reset_s']:.1f}s), success={e['success']}"
        )
    print(f"-> {args.out / 'libero_env.json'}")


if __name__ == "__main__":
    main()
