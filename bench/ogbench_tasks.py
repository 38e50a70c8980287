"""Benchmark on OGBench tasks we did not write: the three scripts and BC from oracle data made with our own tooling.
(Named ogbench_tasks: other bench scripts put bench/ on sys.path, where a bench/ogbench.py would shadow ogbench.)

Per task, the dataset is made once with `python -m common make-dataset --env ogbench:<task>` (cached under
$PI0RL_DATA, default ~/.cache/pi0rl): cube-single task 1 from the task recipe (OGBench's cube oracle aimed at the
task's goal, its noisy-recipe noise at ξ ≤ 0.3: about half the episodes reach the goal), scene task 1 from OGBench's
own "play" recipe (1001-step episodes of random sub-tasks, the task's rewards relabelled). Then, per seed, each run
is a subprocess with a wall-clock budget, its metrics.jsonl read back (a run cut short still reports what it
measured):

- bc:        chunk_awr.py --beta 0 (flow-matching BC on all the data)
- chunk_awr: chunk_awr.py (its defaults)
- flow_ppo:  flow_ppo.py (BC warm start, then PPO)
- acrlpd:    acrlpd_pi0.py, best-of-N and plain π₀ (offline, then online with π₀ trained)
- dsrl:      dsrl_pi0.py, the steered and plain π₀ (BC, then the noise policy online with π₀ frozen)

It prints start → end success per run, wall time, update rate and the peak memory of the run's process tree
(workers included), and writes bench/results/ogbench<--tag>.json.

  python bench/ogbench_tasks.py                                   # both tasks, all runs, seed 1, --minutes each
  python bench/ogbench_tasks.py --tasks cube-noisy --runs bc chunk_awr          # the harder cube data
  python bench/ogbench_tasks.py --tasks cube --runs bc chunk_awr --seeds 1 2 --minutes 5
  python bench/ogbench_tasks.py --tasks cube --runs flow_ppo --eval-episodes 200 --extra="--iterations 80"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import tyro
from acrlpd import split_extra, summary_rows  # bench/acrlpd.py, beside this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")
sys.path.insert(0, ROOT)

# task -> (OGBench id, make-dataset flags)
TASKS = {
    "cube": ("cube-single-singletask-task1-v0", ["--recipe", "task", "--noise", "0.3", "--episodes", "300"]),
    "scene": ("scene-singletask-task1-v0", ["--recipe", "play", "--noise", "0.1", "--episodes", "60"]),
    # harder: the same oracle at ξ ≤ 1.0 (~20% of the episodes reach the goal), where plain BC copies the noise
    "cube-noisy": ("cube-single-singletask-task1-v0", ["--recipe", "task", "--noise", "1.0", "--episodes", "300"]),
}
# run -> (script, flags); the budget flags are added per run (see `budget`)
RUNS = {
    "bc": ("chunk_awr.py", ["--beta", "0"]),
    "chunk_awr": ("chunk_awr.py", []),
    "flow_ppo": ("flow_ppo.py", []),
    "acrlpd": ("acrlpd_pi0.py", ["--num-qs", "2", "--utd", "8"]),
    "dsrl": ("dsrl_pi0.py", []),
}


@dataclass
class Bench:
    tasks: list[str] = field(default_factory=lambda: ["cube", "scene"])
    """tasks (cube, scene, cube-noisy)"""
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    """runs (bc, chunk_awr, flow_ppo, acrlpd)"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """seeds, each a run of every script"""
    minutes: float = 10.0
    """wall-clock budget per run (training, evaluation, start-up); the issue allows 30 per script and task"""
    eval_episodes: int = 50
    """episodes per evaluation"""
    num_envs: int = 16
    """envs (acting and evaluation)"""
    acrlpd_rates: tuple[float, float] = (9.0, 14.0)
    """assumed acrlpd offline π₀+critic and online critic updates/s on 2 cores, to turn the budget into steps"""
    dsrl_rates: tuple[float, float] = (50.0, 15.0)
    """assumed dsrl BC and online SAC updates/s on 2 cores (30% of the budget BC, 70% online)"""
    extra: list[str] = field(default_factory=list)
    """more flags for every run, each item split like a shell line: --extra="--beta 1.5 --eval-every 500" (tyro
    keeps only the last of repeated --extra=… flags)"""
    tag: str = ""
    """suffix of the results file (bench/results/ogbench<tag>.json)"""
    report: str | None = None
    """print the tables of a results file written before (its runs' folders are read again where they still exist)
    and run nothing"""


def dataset(task: str) -> str:
    """The task's oracle dataset, made once (atomically) with the project's own `make-dataset`."""
    env_id, flags = TASKS[task]
    root = os.path.expanduser(os.environ.get("PI0RL_DATA", "~/.cache/pi0rl"))
    path = os.path.join(root, f"ogbench_{env_id}_{'_'.join(f.lstrip('-') for f in flags)}_seed0.npz")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        cmd = [sys.executable, "-m", "common", "make-dataset", "--env", f"ogbench:{env_id}", "--out", path, *flags]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return path


def budget(run: str, b: Bench) -> list[str]:
    """Flags that fit a run into `b.minutes` (about 80% of it for training: start-up and evaluations take the rest)."""
    train_s = b.minutes * 60 * 0.8
    if run in ("bc", "chunk_awr"):
        return ["--time-budget-s", str(train_s * 0.85), "--eval-every", "1000"]
    if run == "flow_ppo":
        return ["--time-budget-s", str(train_s * 0.7), "--eval-every", "20"]  # an evaluation: ~12 s on cube
    if run == "dsrl":
        bc, sac = b.dsrl_rates
        steps = ["--offline-steps", str(int(train_s * 0.3 * bc)), "--online-steps", str(int(train_s * 0.7 * sac))]
        return [*steps, "--eval-every", "0"]
    offline, online = (int(train_s * 0.5 * rate) for rate in b.acrlpd_rates)
    every = max(online // 4, 1)  # about five online evaluations: its lowest one is what bench/acrlpd.py reports
    return ["--offline-steps", str(offline), "--online-steps", str(online), "--eval-every", str(every)]


class PeakMemory(threading.Thread):
    """Samples the resident memory of a process and all its descendants (the env workers) every second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mb, self.done = pid, 0.0, False

    def run(self) -> None:
        while not self.done:
            parents, rss = {}, {}
            for p in os.listdir("/proc"):
                try:
                    with open(f"/proc/{p}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    parents[int(p)], rss[int(p)] = int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError, IndexError):
                    continue
            tree, grew = {self.pid}, True
            while grew:
                more = {p for p, pp in parents.items() if pp in tree} - tree
                tree, grew = tree | more, bool(more)
            self.peak_mb = max(self.peak_mb, sum(rss.get(p, 0) for p in tree) / 2**20)
            time.sleep(1.0)


def read(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    evals = [r for r in rows if "eval/success_rate" in r]
    rates = {k: r[k] for r in rows for k in r if k.startswith("time/") and k.endswith("_per_s")}
    plain = [r.get("eval/plain_success_rate") for r in evals]
    args_path = os.path.join(run_dir, "args.json")  # absent where a run stopped at a bad flag
    args = json.load(open(args_path)) if os.path.exists(args_path) else {}
    phases = {k: args[k] for k in ("offline_steps", "online_steps") if k in args}
    return dict(
        step=[r["step"] for r in evals], success=[r["eval/success_rate"] for r in evals], plain=plain, **rates, **phases
    )


def main(b: Bench) -> dict:
    if b.report is not None:
        if not os.path.isfile(b.report):
            raise SystemExit(f"--report {b.report}: no such file; give a results file, e.g. bench/results/ogbench.json")
        results = json.load(open(b.report))
        for r in results["runs"]:
            if os.path.exists(os.path.join(r["run_dir"], "metrics.jsonl")):
                r.update(read(r["run_dir"]))
        report(results, tag=None)
        return results
    extra = [word for item in b.extra for word in split_extra(item)]
    os.makedirs(OUT, exist_ok=True)
    results: dict = {"bench": vars(b), "runs": []}
    for task in b.tasks:
        data = dataset(task)
        for seed in b.seeds:
            for run in b.runs:
                script, flags = RUNS[run]
                run_dir = os.path.join(ROOT, "runs", f"bench_ogbench_{task}_{run}_{seed}_{int(time.time())}")
                cmd = [
                    sys.executable,
                    script,
                    "--env",
                    f"ogbench:{TASKS[task][0]}",
                    "--dataset",
                    data,
                    "--seed",
                    str(seed),
                    "--run-dir",
                    run_dir,
                    "--eval-envs" if script == "chunk_awr.py" else "--num-envs",  # chunk_awr's envs only evaluate
                    str(b.num_envs),
                    "--eval-episodes",
                    str(b.eval_episodes),
                    *flags,
                    *budget(run, b),
                    *extra,
                ]
                print(" ".join(cmd), flush=True)
                start = time.time()
                proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"})
                memory = PeakMemory(proc.pid)
                memory.start()
                try:
                    proc.wait(timeout=b.minutes * 60 * 1.5)
                    status = "finished" if proc.returncode == 0 else f"exit {proc.returncode}"
                except subprocess.TimeoutExpired:
                    proc.terminate()  # the scripts save and stop on SIGTERM
                    proc.wait()
                    status = "stopped at 1.5× the budget (partial)"
                memory.done = True
                row = dict(
                    task=task,
                    run=run,
                    seed=seed,
                    status=status,
                    wall_s=time.time() - start,
                    peak_mb=memory.peak_mb,
                    run_dir=run_dir,
                    **read(run_dir),
                )
                results["runs"].append(row)
                report(results, b.tag)
    return results


def report(results: dict, tag: str | None = "") -> None:
    """Print the table (and write bench/results/ogbench<tag>.json unless tag is None)."""
    head = ("task", 6), ("run", 10), ("seed", 4), ("start", 6), ("end", 6), ("best", 6), ("wall", 6), ("upd/s", 12)
    print("\n" + " ".join(f"{h:>{w}}" for h, w in head) + "    peak")
    for r in results["runs"]:
        pct = lambda v: "   -  " if v is None else f"{v:6.1%}"  # noqa: E731
        rates = "/".join(f"{v:.1f}" for k, v in sorted(r.items()) if k.endswith("_per_s")) or "-"
        for name, curve in (("", r["success"]), (" plain", r["plain"])):
            if name and not any(v is not None for v in curve):
                continue
            first, last = (curve[0], curve[-1]) if curve else (None, None)
            best = max((v for v in curve if v is not None), default=None)
            print(
                f"{r['task']:>6} {r['run'] + name:>10} {r['seed']:>4} {pct(first)} {pct(last)} {pct(best)} "
                f"{r['wall_s'] / 60:5.1f}m {rates:>12} {r['peak_mb'] / 1024:6.1f}G  {r['status']}"
            )
    phased = [r for r in results["runs"] if r["run"] == "acrlpd" and "online_steps" in r]
    if phased:  # offline end, lowest after the online phase's first quarter, online end (bench/acrlpd.py)
        print("\nacrlpd, best-of-N and plain π₀ by phase:")
        print("\n".join(summary_rows(phased)))
    if tag is not None:
        with open(os.path.join(OUT, f"ogbench{tag}.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main(tyro.cli(Bench))
