"""Scale-free defaults: push with its rewards a·r + b (`--env-kwargs reward_scale A reward_shift B`, the env's and the
dataset's) gives the same run, loss for loss, in chunk_awr (critic units, β in units of the advantages' spread),
acrlpd_pi0 (Q in critic units) and flow_ppo (the value head in running-return units); without acrlpd's or flow_ppo's
normalisation it does not (the checks can fail).
Push pays only at the step that ends an episode in success, so a shift is affine in the return too: G' = (a −
bγ/(1−γ))·G + b/(1−γ) (also past a time limit, whose return continues the last reward), the same run while that
scale is positive (b < a(1−γ)/γ; above, living pays more than success). With rewards before the end a shift is not
affine, and bench/reward_scale.py measures the learning."""

import json
import os

import numpy as np
import pytest
import tiny

import acrlpd_pi0
import chunk_awr
import flow_ppo
from common import RunError, data, envs

AWR_KEYS = ("losses/q", "losses/v", "losses/policy", "charts/weight_mean", "eval/success_rate")
ACRLPD_KEYS = (
    "losses/bc",
    "losses/critic",
    "losses/cql_gap",
    "losses/distill",
    "charts/sample_log_std",
    "eval/success_rate",
    "eval/plain_success_rate",
)
PPO_KEYS = ("losses/value", "losses/policy", "losses/approx_kl", "charts/explained_variance", "eval/success_rate")


def logged(run_dir: str, keys: tuple[str, ...]) -> np.ndarray:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    values = [[r[k] for k in keys if k in r] for r in rows]
    return np.array([v for row in values for v in row], np.float64)


def run(module, flags: dict, tmp_path, name: str, scale: float, shift: float = 0.0) -> np.ndarray:
    run_dir = str(tmp_path / name)
    kwargs = {**flags.get("env_kwargs", {}), "reward_scale": str(scale), "reward_shift": str(shift)}
    module.main(module.Args(**{**flags, "env_kwargs": kwargs}, run_dir=run_dir))
    return logged(run_dir, {chunk_awr: AWR_KEYS, acrlpd_pi0: ACRLPD_KEYS, flow_ppo: PPO_KEYS}[module])


@pytest.mark.slow  # ~12 s each: two tiny runs
@pytest.mark.parametrize("target", ["mc", "td"])
def test_chunk_awr_same_run_at_any_reward_scale(tmp_path, small_push, target):
    flags = dict(tiny.CHUNK_AWR, reward="return", critic_target=target, dataset=small_push)
    base = run(chunk_awr, flags, tmp_path, "base", 1.0)
    scaled = run(chunk_awr, flags, tmp_path, "scaled", 25.0, -0.5)  # G' = 74.5·G − 50
    assert len(base) >= 8
    np.testing.assert_allclose(scaled, base, rtol=2e-3, atol=1e-5)


@pytest.mark.slow  # ~30 s: a tiny run through both phases and another offline only
def test_acrlpd_same_run_at_any_reward_scale(tmp_path, small_push, monkeypatch, tiny_runs):
    flags = dict(tiny.ACRLPD, dataset=small_push)  # offline (π₀ + critic, CQL) and online (critic, π₀ distilled)
    base = logged(tiny_runs("acrlpd_pi0")[0], ACRLPD_KEYS)  # these flags, rewards as they are
    scaled = run(acrlpd_pi0, flags, tmp_path, "scaled", 25.0, -0.5)  # γ = 0.95: G' = 34.5·G − 10
    assert len(base) >= 10
    np.testing.assert_allclose(scaled, base, rtol=2e-3, atol=1e-5)
    # Q in reward units (the data's return statistics unused): CQL's weight against TD changes, the offline phase too
    monkeypatch.setattr(acrlpd_pi0, "return_units", lambda offline: (0.0, 1.0))
    raw = run(acrlpd_pi0, dict(flags, online_steps=0), tmp_path, "raw", 25.0, -0.5)
    assert len(raw) >= 4 and not np.allclose(raw, base[: len(raw)], rtol=2e-3, atol=1e-5)


@pytest.mark.slow  # ~17 s: three tiny runs
def test_flow_ppo_same_run_at_any_reward_scale(tmp_path, small_push):
    flags = dict(tiny.FLOW_PPO, iterations=3, dataset=small_push)
    base = run(flow_ppo, flags, tmp_path, "base", 1.0, -1.0)  # a cost per step: rewards in the tiny run's episodes
    # 2r − 3 = 2(r − 1) − 1: the base run's rewards scaled and shifted, G' = 2.99·G − 1 (γ = 0.99). The first
    # rollout bootstraps from V = 0 in both runs, which the shift does not map, but its value targets are normalised
    # by its own returns' statistics and π₀ waits for --critic-warmup: logged values agree to ~3·10⁻⁵
    scaled = run(flow_ppo, flags, tmp_path, "scaled", 2.0, -3.0)
    assert len(base) > 10
    np.testing.assert_allclose(scaled, base, rtol=2e-3, atol=1e-5)
    # raw value targets: the value loss scales with the rewards (the check above can fail)
    raw = run(flow_ppo, dict(flags, norm_value=False), tmp_path, "raw", 2.0, -3.0)
    assert not np.allclose(raw, base, rtol=2e-3, atol=1e-5)


def test_reward_transform_reaches_env_and_data(small_push):
    spec = envs.make_spec("push", {"reward_scale": "2", "reward_shift": "-1"}, small_push)
    env = spec.make(3, seed=0)
    env.reset(seed=0)
    _, r, *_ = env.step(np.zeros((3, env.action_dim), np.float32), active=np.array([True, False, True]))
    assert r.tolist() == [-1.0, 0.0, -1.0]  # 2·0 − 1 where stepped, 0 where not
    plain = data.load_dataset(small_push, envs.make_spec("push", {}).make(1, 0))
    scaled = data.load_dataset(small_push, env)
    np.testing.assert_allclose(scaled.rewards, 2 * plain.rewards - 1)
    with pytest.raises(RunError, match="reward_scale"):
        envs.make_spec("push", {"reward_scale": "0"})


def test_kept_evaluation_envs_follow_the_reward():
    """Gymnasium evaluation envs are kept between evaluations on their spec (`EnvSpec.make(..., evaluation=True)`,
    closed by `EnvSpec.close`): a spec with another reward transform gets its own, not the plain env."""
    plain, scaled = envs.make_spec("Pendulum-v1", {}), envs.make_spec("Pendulum-v1", {"reward_scale": "3"})
    try:
        a = plain.make(1, seed=0, evaluation=True, first=0, total=1)
        b = scaled.make(1, seed=0, evaluation=True, first=0, total=1)
        assert a is not b and b.reward_transform == (3.0, 0.0) and not hasattr(a, "reward_transform")
        assert scaled.make(1, seed=0, evaluation=True, first=0, total=1) is b  # kept
    finally:
        plain.close()
        scaled.close()
    assert not plain.kept and not scaled.kept
