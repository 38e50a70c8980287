"""Benchmark: chunk AWR vs plain BC (--beta 0) on push's mixed-quality demos, same data and wall-clock budget.

Each (seed, method) run trains for --budget-s seconds of training time (critic phase included for AWR, evaluation
excluded), evaluating every --eval-every policy updates. Prints success before/after per seed, wall time and update
rates; writes bench/results/chunk_awr.json and chunk_awr.png (success vs training time, both methods).

  python bench/chunk_awr.py                            # 2 seeds, 600 s each (~45 min on 2 cores)
  python bench/chunk_awr.py --budget-s 200 --seeds 1 2   # reduced budget
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunk_awr  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class BenchArgs:
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """seeds; each runs AWR and BC"""
    budget_s: float = 600.0
    """training seconds per run (≤ 600: the issue's limit)"""
    beta: float = chunk_awr.Args.beta
    """AWR's β in units of the advantages' spread, chunk_awr.py's default (BC is β = 0; before #20, β = 20 on push's
    raw advantages of std 0.17 was the same weighting)"""
    truncation: Literal["repeat", "bootstrap"] = chunk_awr.Args.truncation
    """AWR's Monte Carlo target past a time limit (chunk_awr.py --truncation; BC reads no critic)"""
    methods: tuple[Literal["awr", "bc"], ...] = ("awr", "bc")
    """which runs per seed: awr, bc or both"""
    eval_every: int = 500
    """policy updates between evaluations"""
    eval_episodes: int = 100
    """episodes per evaluation"""
    episodes: int = 1500
    """dataset size (mixed noise 0.3/0.6/1.0)"""
    tag: str = ""
    """suffix of the result files"""


def curve(run_dir: str) -> list[tuple[float, int, float]]:
    """(training seconds, step, success) of every evaluation in a run's metrics.jsonl."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval/success_rate" in row:
                out.append((row["time/train_s"], row["step"], row["eval/success_rate"]))
    return out


def report(results: list[dict], b: BenchArgs) -> None:
    print(f"\nchunk AWR vs BC, push mixed demos ({b.episodes} episodes), {b.budget_s:.0f} s training each")
    print(
        f"{'seed':>4} {'method':>6} {'before':>7} {'after':>6} {'best':>5} {'π updates':>9} {'upd/s':>6} {'wall s':>7}"
    )
    for r in results:
        c = r["curve"]
        print(
            f"{r['seed']:>4} {r['method']:>6} {c[0][2]:>7.2f} {c[-1][2]:>6.2f} {max(x[2] for x in c):>5.2f} "
            f"{r['step']:>9} {r['updates_per_s']:>6.1f} {r['wall_s']:>7.0f}"
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"chunk_awr{b.tag}.json"), "w") as f:
        json.dump({"args": vars(b), "runs": results}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        c = r["curve"]
        ax.plot(
            [x[0] for x in c],
            [x[2] for x in c],
            "-o" if r["method"] == "awr" else "--s",
            ms=3,
            color="C0" if r["method"] == "awr" else "C1",
            label=f"{r['method']} seed {r['seed']}",
        )
    ax.set_xlabel("training time (s, 2 shared CPU cores)")
    ax.set_ylabel("success rate")
    ax.set_title(f"chunk AWR (β={b.beta:g}) vs BC on push, mixed demos")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"chunk_awr{b.tag}.png"), dpi=120)


def main(b: BenchArgs) -> None:
    results = []
    for seed in b.seeds:
        for method, beta in [m for m in (("awr", b.beta), ("bc", 0.0)) if m[0] in b.methods]:
            t = time.time()
            out = chunk_awr.main(
                chunk_awr.Args(
                    seed=seed,
                    beta=beta,
                    truncation=b.truncation,
                    time_budget_s=b.budget_s,
                    policy_steps=10**7,
                    eval_every=b.eval_every,
                    eval_episodes=b.eval_episodes,
                    episodes=b.episodes,
                    save_every=10**9,
                    run_dir=os.path.join("runs", f"bench_chunk_awr{b.tag}_{method}_{seed}_{int(t)}"),
                )
            )
            results.append(
                {
                    "seed": seed,
                    "method": method,
                    "beta": beta,
                    "step": out["policy_updates"],
                    "updates_per_s": out["time/policy_updates_per_s"],
                    "wall_s": time.time() - t,
                    "train_s": out["time/train_s"],
                    "curve": curve(out["run_dir"]),
                }
            )
            report(results, b)  # partial results are kept after every run


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
