"""Benchmark: dsrl_pi0.py from the BC start, per seed: π₀ alone at the end of BC (plain π₀, w ~ N(0, I)), the
steered π₀ at the end of the online phase, and the wall-clock time of the whole run.

Each run is `python dsrl_pi0.py --seed S` plus --extra, in a subprocess (its own wall clock, start-up included). The
table: the BC start (plain π₀ after BC, the π₀ that is then frozen), the steered π₀ and plain π₀ at the online end,
the lowest and the last online-episode success (the last 100 episodes, every --log-every updates), the minutes.
It writes bench/results/dsrl<tag>.json and dsrl<tag>.png (the online episodes' success against online updates).

  python bench/dsrl.py                                   # push, seeds 1-3 (~25 min on 2 cores)
  python bench/dsrl.py --seeds 1 --extra="--critic aliased" --tag _aliased
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro
from acrlpd import split_extra  # bench/acrlpd.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


@dataclass
class BenchArgs:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds, one run each"""
    extra: str = ""
    """more dsrl_pi0.py flags, one string split like a shell line: --extra="--env ID --dataset PATH" """
    tag: str = ""
    """suffix of the result files"""


def read(run_dir: str) -> dict:
    """A finished run's numbers: the evaluations at each phase's end and the online episodes' success curve."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/success_rate" in r]
    online = [(r["step"], r["charts/online_success_rate"]) for r in rows if "charts/online_success_rate" in r]
    args = json.load(open(os.path.join(run_dir, "args.json")))
    bc_end = [r for r in evals if r["step"] == args["offline_steps"]][0]  # the start's row where there is no BC
    out = {"bc_plain": bc_end["eval/plain_success_rate"], "bc_steered": bc_end["eval/success_rate"]}
    out.update(end_steered=evals[-1]["eval/success_rate"], end_plain=evals[-1]["eval/plain_success_rate"])
    out.update(online=online, offline_steps=args["offline_steps"], critic=args["critic"])
    return out


def report(results: list[dict], b: BenchArgs) -> None:
    print(f"\ndsrl_pi0.py {b.extra}")
    print(
        f"{'seed':>4} | {'BC start':>8} | {'steered end':>11} {'plain end':>9} | {'online min':>10} {'last':>5} | min"
    )
    for r in results:
        curve = [s for _, s in r["online"]] or [float("nan")]
        print(
            f"{r['seed']:>4} | {r['bc_plain']:>8.0%} | {r['end_steered']:>11.0%} {r['end_plain']:>9.0%} | "
            f"{min(curve):>10.0%} {curve[-1]:>5.0%} | {r['wall_s'] / 60:.1f}"
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"dsrl{b.tag}.json"), "w") as f:
        json.dump({"args": vars(b), "runs": results}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(results):
        steps = [s - r["offline_steps"] for s, _ in r["online"]]
        ax.plot(steps, [v for _, v in r["online"]], color=f"C{i}", label=f"seed {r['seed']}: online episodes")
        ax.axhline(r["bc_plain"], color=f"C{i}", ls=":", lw=1)
        ax.plot([steps[-1]], [r["end_steered"]], "o", color=f"C{i}")
    ax.set_xlabel("online updates")
    ax.set_ylabel("success rate")
    flags = shlex.split(b.extra)
    env = flags[flags.index("--env") + 1] if "--env" in flags[:-1] else "push"
    ax.set_title(
        f"dsrl_pi0.py on {env}: online episodes (last 100)\ndotted: BC start (plain π₀); dot: steered eval", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"dsrl{b.tag}.png"), dpi=120)


def main(b: BenchArgs) -> None:
    extra = split_extra(b.extra)  # before any run
    results = []
    for seed in b.seeds:
        run_dir = os.path.join(ROOT, "runs", f"bench_dsrl{b.tag}_{seed}_{int(time.time())}")
        cmd = [sys.executable, "dsrl_pi0.py", "--seed", str(seed), "--run-dir", run_dir, *extra]
        print(" ".join(cmd), flush=True)
        t = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
        results.append({"seed": seed, "cmd": cmd, "wall_s": time.time() - t, **read(run_dir)})
        report(results, b)  # partial results are kept after every run


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
