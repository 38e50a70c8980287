"""Benchmark of the scale-free defaults: chunk_awr.py and flow_ppo.py on push with rewards a·r + b.

Each (a, b) in --rewards transforms the env's rewards and the dataset's (`--env-kwargs reward_scale a reward_shift
b`); success is the env's own and unchanged. On push, which pays only at the step that ends an episode in success,
every (a, b) with b < a(1−γ)/γ maps returns affinely, G' = (a − bγ/(1−γ))·G + b/(1−γ), so the scale-free scripts
make the same run (tests/test_reward_scale.py checks it loss for loss); on a task with rewards before the end a
shift is not affine and the runs may differ. chunk_awr trains --awr-steps policy updates per
setting (its critic phase first); flow_ppo starts every setting from one shared BC warm start per seed (flow_ppo.py
--iterations 0, then --pi0-checkpoint), then --ppo-iterations of PPO. Prints start → end per run and writes
bench/results/reward_scale.json after every run.

    python bench/reward_scale.py                                       # (1, 0), (1, −1), (10, −5); seed 1
    python bench/reward_scale.py --scripts flow_ppo --seeds 1 2 --rewards 1 0 0.1 -0.1
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
import chunk_awr  # noqa: E402
import flow_ppo  # noqa: E402


@dataclass
class BenchArgs:
    rewards: list[float] = field(default_factory=lambda: [1.0, 0.0, 1.0, -1.0, 10.0, -5.0])
    """(a, b) pairs, flattened: r → a·r + b"""
    scripts: list[str] = field(default_factory=lambda: ["chunk_awr", "flow_ppo"])
    """chunk_awr, flow_ppo"""
    seeds: list[int] = field(default_factory=lambda: [1])
    """seeds"""
    awr_steps: int = 6000
    """chunk_awr's policy updates per run (after its 3,000 critic updates)"""
    ppo_iterations: int = 50
    """flow_ppo's PPO iterations per run, from the shared BC start (budgets in steps: a loaded machine changes the
    wall time, not the result)"""
    eval_episodes: int = 200
    """episodes per evaluation"""
    out: str = os.path.join(ROOT, "bench", "results", "reward_scale.json")
    """results file"""


def main(b: BenchArgs) -> list[dict]:
    pairs = list(zip(b.rewards[::2], b.rewards[1::2], strict=True))
    results: list[dict] = []
    tag = int(time.time())
    for seed in b.seeds:
        bc_dir = None
        for script in b.scripts:
            for a, shift in pairs:
                kwargs = {"reward_scale": str(a), "reward_shift": str(shift)}
                t0 = time.time()
                if script == "chunk_awr":
                    args = chunk_awr.Args(
                        seed=seed,
                        env_kwargs=kwargs,
                        policy_steps=b.awr_steps,
                        eval_episodes=b.eval_episodes,
                        eval_every=3000,
                    )
                    out = chunk_awr.main(args)
                else:
                    if bc_dir is None:  # the BC start, shared by every reward setting of this seed
                        bc_dir = os.path.join(ROOT, "runs", f"bench_reward_scale_bc__{seed}__{tag}")
                        flow_ppo.main(
                            flow_ppo.Args(seed=seed, iterations=0, eval_episodes=b.eval_episodes, run_dir=bc_dir)
                        )
                    budget = dict(iterations=b.ppo_iterations, eval_every=25)
                    args = flow_ppo.Args(
                        seed=seed, env_kwargs=kwargs, pi0_checkpoint=bc_dir, eval_episodes=b.eval_episodes, **budget
                    )
                    out = flow_ppo.main(args)
                rows = [json.loads(line) for line in open(os.path.join(out["run_dir"], "metrics.jsonl"))]
                curve = [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
                results.append(
                    dict(
                        script=script,
                        seed=seed,
                        scale=a,
                        shift=shift,
                        start=curve[0][1],
                        end=curve[-1][1],
                        curve=curve,
                        wall_s=time.time() - t0,
                        run_dir=out["run_dir"],
                    )
                )
                print(f"\n{'script':<10} {'seed':>4} {'a':>6} {'b':>6} {'start':>6} {'end':>6} {'wall s':>7}")
                for r in results:
                    print(
                        f"{r['script']:<10} {r['seed']:>4} {r['scale']:>6g} {r['shift']:>6g} {r['start']:>6.3f} "
                        f"{r['end']:>6.3f} {r['wall_s']:>7.0f}"
                    )
                os.makedirs(os.path.dirname(b.out), exist_ok=True)
                with open(b.out + ".tmp", "w") as f:
                    json.dump({"args": vars(b), "results": results}, f, indent=2)
                os.replace(b.out + ".tmp", b.out)
    return results


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
