"""Benchmark: π₀'s weights averaged (--ema-decay) against the last update's weights, in chunk_awr.py's default run.

Gradients and AdamW act on the raw weights θ whatever the average does, so one run with --eval-raw evaluates both
policies on the same episodes: eval/success_rate is the average θ̄ (--ema-decay d), eval/raw_success_rate is θ, the
policy a run with --ema-decay 0 evaluates (the same updates, data order and evaluation episodes). For each seed and
method (AWR; BC is --beta 0) it prints the end success and, over the last five evaluations of both, the standard
deviation, the standard deviation around their least-squares line (the climb taken out), the swing (mean change from
one evaluation to the next), the largest drop below an earlier one, and one evaluation's binomial noise (`summary`);
it writes bench/results/ema<tag>.json and ema<tag>.png (success against updates). --report-only --tag T prints a
finished benchmark's table again from its json.

  python bench/ema.py                                    # push, AWR and BC, seeds 1-3 (~50 min on 2 cores)
  python bench/ema.py --seeds 1 --methods bc --extra="--policy-steps 4000"   # quick look
  python bench/ema.py --extra="--env ID --dataset PATH --eval-episodes 50" --tag _cube   # another task's data
  python bench/ema.py --extra="--eval-every=1000 --eval-episodes=2000 --eval-envs=500" --tag _push2000   # ±1 point
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro
from acrlpd import split_extra  # bench/acrlpd.py, beside this file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import chunk_awr  # noqa: E402
from common import runlog  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class BenchArgs:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """seeds; each runs every method"""
    methods: tuple[Literal["awr", "bc"], ...] = ("awr", "bc")
    """awr (chunk_awr.py's default) and bc (--beta 0)"""
    ema_decay: float = chunk_awr.Args.ema_decay
    """the average's d (chunk_awr.py's default)"""
    last: int = 5
    """evaluations at the end whose standard deviation is reported"""
    extra: str = ""
    """more chunk_awr.py flags, one string split like a shell line: --extra="--env ID --dataset PATH" """
    tag: str = ""
    """suffix of the result files"""
    report_only: bool = False
    """run nothing: summarise the runs of bench/results/ema<tag>.json again (the table, the json, the plot), over the
    --last evaluations given here"""


def curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """(policy update, success) of every evaluation of a run: "ema" (θ̄, eval/success_rate) and "raw" (θ)."""
    out = {"ema": [], "raw": []}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval/raw_success_rate" in row:
                out["ema"].append((row["step"], row["eval/success_rate"]))
                out["raw"].append((row["step"], row["eval/raw_success_rate"]))
    return out


def summary(curve: list[tuple[int, float]], last: int, episodes: int) -> dict[str, float]:
    """start, end, and over the last `last` evaluations: mean; standard deviation (the issue's measure: a policy still
    climbing shows its climb here); the standard deviation around their least-squares line (the climb taken out: what
    is left is the policy's ups and downs plus the evaluation's noise); swing (the mean absolute change from one
    evaluation to the next); drop (the largest fall of an evaluation below the best one before it among them); and
    floor, the binomial noise √(p(1 − p)/E) of one evaluation of E episodes at their mean p (a policy that did not
    change at all, evaluated on fresh episodes, would show about that much)."""
    tail = np.array([s for _, s in curve[-last:]])
    x = np.arange(len(tail), dtype=np.float64)
    resid = tail - np.polyval(np.polyfit(x, tail, 1), x) if len(tail) > 2 else tail - tail.mean()
    p = float(tail.mean())
    out = {"start": curve[0][1], "end": curve[-1][1], "last_mean": p, "last_std": float(tail.std())}
    out |= {"last_detrended_std": float(resid.std()), "floor": float(np.sqrt(p * (1 - p) / episodes))}
    out |= {"last_drop": float(np.max(np.maximum.accumulate(tail) - tail))}
    return out | {"last_swing": float(np.abs(np.diff(tail)).mean()) if len(tail) > 1 else 0.0}


def report(results: list[dict], b: BenchArgs) -> None:
    print(f"\n--ema-decay {b.ema_decay} against 0 (the raw weights), chunk_awr.py {b.extra}")
    print(f"over the last {b.last} evaluations, θ̄ / θ: std, std around their line (detrended), swing, largest drop")
    keys = ("last_std", "last_detrended_std", "last_swing", "last_drop")
    head = " | ".join(f"{k:>11}" for k in ("std", "detrended", "swing", "drop"))
    head = f"{'end θ̄':>6} {'θ':>5} | {head} | {'floor':>5}"
    print(f"{'seed':>4} {'method':>6} | {head} | {'wall s':>6}")
    for r in results:
        e, w = r["ema"], r["raw"]
        pairs = " | ".join(f"{e[k]:.3f}/{w[k]:.3f}" for k in keys)
        print(
            f"{r['seed']:>4} {r['method']:>6} | {e['end']:>6.2f} {w['end']:>5.2f} | {pairs} | "
            f"{w['floor']:>5.3f} | {r['wall_s']:>6.0f}"
        )
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"ema{b.tag}.json"), "w") as f:
        json.dump({"args": vars(b), "runs": results}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in results})
    flags = shlex.split(b.extra)
    env = flags[flags.index("--env") + 1] if "--env" in flags[:-1] else "push"
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        for i, r in enumerate(x for x in results if x["method"] == method):
            for kind, style in (("ema", "-o"), ("raw", ":s")):
                c = r["curves"][kind]
                label = f"seed {r['seed']}, {'θ̄ (--ema-decay ' + str(b.ema_decay) + ')' if kind == 'ema' else 'θ (0)'}"
                ax.plot([x[0] for x in c], [x[1] for x in c], style, ms=3, color=f"C{i}", label=label)
        ax.set_xlabel("updates (critic then policy)")
        ax.set_ylabel("success rate")
        ax.set_title(f"chunk_awr.py {method} on {env}\naveraged θ̄ against raw θ", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, f"ema{b.tag}.png"), dpi=120)


def eval_episodes(argv: list[str]) -> int:
    """--eval-episodes of a chunk_awr.py command line (its env's config when the line does not name it)."""
    return runlog.cli(chunk_awr.Args, chunk_awr.CONFIGS, argv).eval_episodes


def main(b: BenchArgs) -> None:
    extra = split_extra(b.extra)  # before any run
    if b.report_only:
        path = os.path.join(RESULTS, f"ema{b.tag}.json")
        if not os.path.exists(path):
            raise SystemExit(f"--report-only: no {path}; run the benchmark with --tag {b.tag!r} first")
        with open(path) as f:
            saved = json.load(f)
        ran = BenchArgs(**saved["args"] | {"last": b.last, "report_only": False})  # the flags it ran with
        for r in saved["runs"]:
            episodes = eval_episodes(r["argv"])
            r.update({k: summary(v, ran.last, episodes) for k, v in r["curves"].items()})
        return report(saved["runs"], ran)
    results = []
    for seed in b.seeds:
        for method in b.methods:
            t = time.time()
            run_dir = os.path.join("runs", f"bench_ema{b.tag}_{method}_{seed}_{int(t)}")
            argv = [f"--seed={seed}", f"--ema-decay={b.ema_decay}", "--eval-raw", f"--run-dir={run_dir}"]
            argv += extra
            if method == "bc":
                argv.append("--beta=0")
            with runlog.one_line_errors():
                args = runlog.cli(chunk_awr.Args, chunk_awr.CONFIGS, argv)
                out = chunk_awr.main(args)
            c = curves(out["run_dir"])
            result = {"seed": seed, "method": method, "argv": argv, "wall_s": time.time() - t, "curves": c}
            result.update({k: summary(v, b.last, args.eval_episodes) for k, v in c.items()})
            results.append(result)
            report(results, b)  # partial results are kept after every run


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
