"""Benchmark of flow_ppo.py on push: success of the BC start and after PPO, per seed, for both noise methods.

Per seed, one BC warm start (flow_ppo.py with --iterations 0) is shared by both noise methods, which then start from
its run folder (--pi0-checkpoint). Prints a table, writes bench/results/flow_ppo.json and flow_ppo.png (success
against environment steps). Results are written after every run, so a partial benchmark keeps what it measured.

    python bench/flow_ppo.py                                   # 2 seeds × 2 methods, the default budget
    python bench/flow_ppo.py --seeds 1 --ppo-minutes 1 --bc-steps 1000   # a quick look
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow_ppo as fp  # noqa: E402


@dataclass
class BenchArgs:
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """seeds (each: one BC start, then PPO with each method)"""
    methods: list[str] = field(default_factory=lambda: ["flow_noise", "flow_sde"])
    """noise methods to compare"""
    bc_steps: int = fp.Args.bc_steps
    """BC warm-start steps (flow_ppo.py's default)"""
    ppo_minutes: float = 5.0
    """budget of each PPO run: rollouts and updates (flow_ppo.py --time-budget-s; start-up and evaluation excluded)"""
    iterations: int = 300
    """upper bound on PPO iterations per run"""
    eval_episodes: int = 200
    """episodes per evaluation"""
    out: str = os.path.join(ROOT, "bench", "results", "flow_ppo")
    """output prefix (.json, .png)"""


def eval_curve(run_dir: str) -> list[tuple[int, float]]:
    """(PPO iteration, eval success) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]


def report(results: list[dict], b: BenchArgs) -> None:
    print(
        f"\n{'method':<11} {'seed':>4} {'BC start':>9} {'after PPO':>9} {'Δ':>7} {'iters':>6} {'env steps':>10} "
        f"{'PPO s':>6} {'env steps/s':>11}"
    )
    for r in results:
        print(
            f"{r['method']:<11} {r['seed']:>4} {r['start']:>9.3f} {r['final']:>9.3f} {r['final'] - r['start']:>+7.3f} "
            f"{r['iterations']:>6} {r['env_steps']:>10.0f} {r['ppo_wall_s']:>6.0f} {r['sps']:>11.0f}"
        )
    os.makedirs(os.path.dirname(b.out), exist_ok=True)
    with open(b.out + ".json", "w") as f:
        json.dump({"args": vars(b), "results": results}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {"flow_noise": "tab:blue", "flow_sde": "tab:orange"}
    for r in results:
        steps_per_it = r["env_steps"] / max(r["iterations"], 1)
        xs, ys = zip(*[(it * steps_per_it / 1e3, s) for it, s in r["curve"]], strict=True)
        ax.plot(xs, ys, "-o", ms=3, color=colours.get(r["method"]), label=f"{r['method']} seed {r['seed']}")
    ax.set_xlabel("PPO environment steps (thousands)")
    ax.set_ylabel("eval success (deterministic ODE)")
    ax.set_title("flow_ppo.py on push: from the BC start (x = 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(b.out + ".png", dpi=120)
    print(f"-> {b.out}.json, {b.out}.png")


def main(b: BenchArgs) -> list[dict]:
    results: list[dict] = []
    tag = int(time.time())
    for seed in b.seeds:
        t0 = time.time()
        bc_dir = os.path.join(ROOT, "runs", f"bench_flow_ppo_bc__{seed}__{tag}")
        bc = fp.main(
            fp.Args(seed=seed, bc_steps=b.bc_steps, iterations=0, eval_episodes=b.eval_episodes, run_dir=bc_dir)
        )
        bc_wall = time.time() - t0
        for method in b.methods:
            t0 = time.time()
            out = fp.main(
                fp.Args(
                    seed=seed,
                    noise_method=method,
                    pi0_checkpoint=bc_dir,
                    iterations=b.iterations,
                    time_budget_s=60 * b.ppo_minutes,
                    eval_episodes=b.eval_episodes,
                    eval_every=10,
                )
            )
            curve = eval_curve(out["run_dir"])
            results.append(
                {
                    "method": method,
                    "seed": seed,
                    "start": bc["eval/success_rate"],
                    "final": out["eval/success_rate"],
                    "iterations": curve[-1][0],
                    "env_steps": out["charts/env_steps"],
                    "ppo_wall_s": time.time() - t0,
                    "bc_wall_s": bc_wall,
                    "sps": out["charts/env_steps"] / out["time/wall_s"],
                    "noise_std": out["charts/noise_std"],
                    "clip_frac": out["charts/clip_frac"],
                    "curve": curve,
                    "run_dir": out["run_dir"],
                }
            )
            report(results, b)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
