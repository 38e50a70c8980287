"""Learning benchmark for acrlpd_pi0.py: best-of-N and plain-π₀ success over offline and online training (π₀ trained
online), 2 seeds.

Each seed runs `acrlpd_pi0.py` in a subprocess with a wall-clock budget (--minutes, default 20 per seed; the issue
allows 60); its metrics.jsonl is read back whether the run finished or was stopped, so a partial run still prints
what it measured.
Update counts come from the budget and assumed update rates (--rate for the offline joint π₀ + critic updates,
--online-rate for the online critic updates on cached features, π₀'s update included; the default run prints them as
time/*_updates_per_s).

  python bench/acrlpd.py                                  # 2 seeds × 20 min
  python bench/acrlpd.py --minutes 60 --eval-every 8000   # the largest budget the issue allows
Writes bench/results/acrlpd.json and bench/results/acrlpd.png.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")


@dataclass
class Bench:
    seeds: tuple[int, ...] = (1, 2)
    """seeds to run, one after the other"""
    minutes: float = 20.0
    """wall-clock budget per seed (training and evaluation); the issue allows up to 60"""
    rate: float = 27.0
    """assumed offline updates/s (π₀ and critic together), to turn the budget into update counts"""
    online_rate: float = 75.0
    """assumed online critic updates/s (cached features; includes acting in 64 envs, π₀'s update and the warm-up)"""
    offline_share: float = 0.6
    """share of the wall time spent offline"""
    eval_every: int = 4000
    """updates between evaluations (the curve's resolution)"""
    eval_episodes: int = 100
    """episodes per evaluation"""
    extra: list[str] = field(default_factory=list)
    """more acrlpd_pi0.py flags, e.g. --extra --q-agg min2"""


def read_curve(run_dir: str) -> dict:
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path)]
    evals = [r for r in rows if "eval/success_rate" in r]
    rates = {k: r[k] for r in rows for k in r if k.startswith("time/") and k.endswith("updates_per_s")}
    keys = (
        "success_rate",
        "plain_success_rate",
        "q_pred",
        "q_realised",
        "plain_q_pred",
        "plain_q_realised",
    )
    return {"step": [r["step"] for r in evals], **{k: [r.get(f"eval/{k}") for r in evals] for k in keys}, **rates}


def main(b: Bench) -> dict:
    os.makedirs(OUT, exist_ok=True)
    seconds = b.minutes * 60 * 0.85  # ~15% of the wall time goes to compilation and evaluation
    offline = int(seconds * b.offline_share * b.rate)
    online = int(seconds * (1 - b.offline_share) * b.online_rate)
    results = {
        "bench": vars(b) | {"seeds": list(b.seeds)},
        "offline_steps": offline,
        "online_steps": online,
        "runs": {},
    }
    for seed in b.seeds:
        run_dir = os.path.join(ROOT, "runs", f"bench_acrlpd_{seed}_{int(time.time())}")
        cmd = [
            sys.executable,
            "acrlpd_pi0.py",
            "--seed",
            str(seed),
            "--run-dir",
            run_dir,
            "--offline-steps",
            str(offline),
            "--online-steps",
            str(online),
            "--eval-every",
            str(b.eval_every),
            "--eval-episodes",
            str(b.eval_episodes),
            *b.extra,
        ]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        try:
            subprocess.run(cmd, cwd=ROOT, timeout=b.minutes * 60 * 1.3, env={**os.environ, "WANDB_MODE": "offline"})
            status = "finished"
        except subprocess.TimeoutExpired:
            status = "stopped at the time limit (partial)"
        except KeyboardInterrupt:
            status = "interrupted (partial)"
        curve = read_curve(run_dir) | {"wall_s": time.time() - t0, "status": status, "run_dir": run_dir}
        results["runs"][seed] = curve
        report(results, offline)
        if status.startswith("interrupted"):
            break
    return results


def report(results: dict, offline: int) -> None:
    print(f"\n{'seed':>4} {'update':>7} {'phase':>7} {'BoN':>6} {'plain':>6} {'Q pred':>7} {'realised':>8}")
    for seed, c in results["runs"].items():
        for i, s in enumerate(c["step"]):
            f = lambda v: "  -  " if v is None else f"{v:.1%}" if v <= 1.0 else f"{v:.2f}"
            print(
                f"{seed:>4} {s:>7} {'offline' if s <= offline else 'online':>7} {f(c['success_rate'][i]):>6} "
                f"{f(c['plain_success_rate'][i]):>6} "
                f"{c['q_pred'][i]:>7.3f} {c['q_realised'][i]:>8.3f}"
            )
        off = [p for s, p in zip(c["step"], c["plain_success_rate"], strict=True) if s <= offline]
        fin, plain = (c["success_rate"][-1], c["plain_success_rate"][-1]) if c["success_rate"] else (None, None)
        gain = f"BoN {fin:.1%}, plain π₀ {(plain - max(off)) * 100:+.1f} points" if fin is not None and off else "n/a"
        print(
            f"seed {seed}: {c['status']}, wall {c['wall_s'] / 60:.1f} min, offline "
            f"{c.get('time/offline_updates_per_s', float('nan')):.1f} upd/s, online "
            f"{c.get('time/online_updates_per_s', float('nan')):.1f} upd/s; final {gain} over the best offline plain π₀"
        )
    with open(os.path.join(OUT, "acrlpd.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for seed, c in results["runs"].items():
            ax.plot(c["step"], c["success_rate"], "-o", label=f"best-of-N, seed {seed}")
            ax.plot(c["step"], c["plain_success_rate"], "--s", label=f"plain π₀, seed {seed}")
        ax.axvline(offline, color="grey", lw=1)
        ax.text(offline, 0.02, " online →", color="grey")
        ax.set(xlabel="updates", ylabel="success rate", title="acrlpd_pi0 on push", ylim=(0, 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(OUT, "acrlpd.png"), dpi=120)
        plt.close(fig)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main(tyro.cli(Bench))
