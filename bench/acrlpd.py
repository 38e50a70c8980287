"""Learning benchmark for acrlpd_pi0.py: best-of-N and plain π₀ at the offline end, at their lowest in the online
phase, and at the online end, per seed.

Each seed runs `python acrlpd_pi0.py --seed S` plus --extra in a subprocess (its own wall clock, start-up included):
by default the default run, exactly as a user types it. Its metrics.jsonl is read back whether the run finished or
was stopped, so a partial run still prints what it measured.

For every seed and both policies (best-of-N, plain π₀) the table gives the offline end, the lowest evaluation after
the first quarter of the online phase ("low"; an evaluation needs --eval-every, the default run only evaluates at
each phase's end), the online end, and the online end minus the offline end ("gain").

  python bench/acrlpd.py                                            # push, the default run, seeds 1-3
  python bench/acrlpd.py --extra="--eval-every 2000" --tag _trace   # the same runs, evaluated during the online phase
  python bench/acrlpd.py --minutes 30 --seeds 1 2                   # a 30-minute budget turned into update counts
Writes bench/results/acrlpd<tag>.json and bench/results/acrlpd<tag>.png.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")


@dataclass
class Bench:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds to run, one after the other"""
    minutes: float = 0.0
    """0: the default run's update counts; > 0: a wall-clock budget per seed turned into update counts by --rate,
    --online-rate and --offline-share"""
    rate: float = 18.0
    """with --minutes: assumed offline updates/s (π₀ and critic together)"""
    online_rate: float = 50.0
    """with --minutes: assumed online critic updates/s (acting, π₀'s update and the warm-up included)"""
    offline_share: float = 0.6
    """with --minutes: share of the wall time spent offline"""
    extra: str = ""
    """more acrlpd_pi0.py flags, one string split like a shell line: --extra="--eval-every 2000 --q-agg min2" """
    tag: str = ""
    """suffix of the result files"""


def read_run(run_dir: str) -> dict:
    """A run's evaluations (step, best-of-N, plain π₀, the critic's calibration), its phase lengths and update rates."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    args = json.load(open(os.path.join(run_dir, "args.json")))
    evals = [r for r in rows if "eval/success_rate" in r]
    rates = {k: r[k] for r in rows for k in r if k.startswith("time/") and k.endswith("updates_per_s")}
    return {
        "offline_steps": args["offline_steps"],
        "online_steps": args["online_steps"],
        "step": [r["step"] for r in evals],
        "success": [r["eval/success_rate"] for r in evals],
        "plain": [r.get("eval/plain_success_rate") for r in evals],
        "q_pred": [r.get("eval/q_pred") for r in evals],
        "q_realised": [r.get("eval/q_realised") for r in evals],
        **rates,
    }


def phases(step: list[int], curve: list[float | None], offline_steps: int, online_steps: int) -> dict:
    """Offline end, lowest evaluation after the first quarter of the online phase, online end (None where not
    evaluated): the numbers issue 39's targets are stated in."""
    total = offline_steps + online_steps
    at = dict(zip(step, curve, strict=True))
    quarter = offline_steps + online_steps / 4
    late = [v for s, v in zip(step, curve, strict=True) if s >= quarter and v is not None]
    start = at.get(offline_steps)
    end = at.get(total)
    gain = end - start if end is not None and start is not None else None
    return {"offline_end": start, "online_low": min(late, default=None), "online_end": end, "gain": gain}


def summary_rows(runs: list[dict], label_plain: str = "plain") -> list[str]:
    """The per-seed table of `phases` for best-of-N and plain π₀ (shared with bench/ogbench_tasks.py)."""
    pct = lambda v: "    - " if v is None else f"{v:6.0%}"  # noqa: E731
    pts = lambda v: "     - " if v is None else f"{100 * v:+6.0f}"  # noqa: E731
    lines = [f"{'seed':>4} {'policy':>7} | {'offline':>7} {'low':>6} {'end':>6} {'gain':>7}"]
    for r in runs:
        for name, key in (("BoN", "success"), (label_plain, "plain")):
            p = phases(r["step"], r[key], r["offline_steps"], r["online_steps"])
            lines.append(
                f"{r['seed']:>4} {name:>7} | {pct(p['offline_end']):>7} {pct(p['online_low'])} {pct(p['online_end'])} "
                f"{pts(p['gain'])}"
            )
    return lines


def split_extra(text: str) -> list[str]:
    """--extra split like a shell line; an unclosed quote stops with one line, before any run (the other benches
    use this too)."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise SystemExit(f"--extra {text!r}: {e}; give the flags as one shell-quoted line") from None


def main(b: Bench) -> dict:
    extra = split_extra(b.extra)
    os.makedirs(OUT, exist_ok=True)
    steps = []
    if b.minutes > 0:
        seconds = b.minutes * 60 * 0.85  # ~15% of the wall time goes to compilation and evaluation
        offline = int(seconds * b.offline_share * b.rate)
        online = int(seconds * (1 - b.offline_share) * b.online_rate)
        steps = ["--offline-steps", str(offline), "--online-steps", str(online)]
    results = {"bench": vars(b), "runs": []}
    for seed in b.seeds:
        run_dir = os.path.join(ROOT, "runs", f"bench_acrlpd{b.tag}_{seed}_{int(time.time())}")
        cmd = [sys.executable, "acrlpd_pi0.py", "--seed", str(seed), "--run-dir", run_dir, *steps]
        cmd += extra
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        try:
            limit = max(b.minutes, 30) * 60 * 1.5
            proc = subprocess.run(cmd, cwd=ROOT, timeout=limit, env={**os.environ, "WANDB_MODE": "offline"})
            status = "finished" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = "stopped at the time limit (partial)"
        except KeyboardInterrupt:
            status = "interrupted (partial)"
        run = {"seed": seed, "cmd": cmd, "status": status, "wall_s": time.time() - t0, "run_dir": run_dir}
        results["runs"].append(run | read_run(run_dir))
        report(results, b)
        if status.startswith("interrupted"):
            break
    return results


def report(results: dict, b: Bench) -> None:
    print(f"\nacrlpd_pi0.py {b.extra}".rstrip())
    print("\n".join(summary_rows(results["runs"])))
    for r in results["runs"]:
        print(
            f"seed {r['seed']}: {r['status']}, {r['wall_s'] / 60:.1f} min, {r['offline_steps']} offline updates at "
            f"{r.get('time/offline_updates_per_s', float('nan')):.1f}/s, {r['online_steps']} online at "
            f"{r.get('time/online_updates_per_s', float('nan')):.1f}/s"
        )
    with open(os.path.join(OUT, f"acrlpd{b.tag}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results["runs"]):
        ax.plot(r["step"], r["success"], "-o", color=f"C{i}", label=f"best-of-N, seed {r['seed']}")
        ax.plot(r["step"], r["plain"], "--s", color=f"C{i}", label=f"plain π₀, seed {r['seed']}")
        ax.axvline(r["offline_steps"], color="grey", lw=1)
    ax.set(xlabel="updates (offline, then online critic updates)", ylabel="success rate", ylim=(0, 1))
    ax.set_title(f"acrlpd_pi0.py {b.extra}".rstrip(), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"acrlpd{b.tag}.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Bench))
