"""Tests for chunk_awr.py: smoke, flag checks, the sub-goal chunk reward, weight clipping, β = 0 is BC."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tiny  # noqa: E402

import chunk_awr  # noqa: E402
from common import data, envs, openpi, pi0  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    episodes=12,
    eval_episodes=2,
    batch_size=8,
    critic_batch_size=16,
    updates_per_call=5,
    log_every=5,
    eval_every=0,
    save_every=10,
)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PI0RL_DATA", str(tmp_path_factory.getbasetemp() / "data"))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_smoke(tiny_runs):
    """The critic phase (TD on sub-goal chunk rewards), then the weighted flow-matching phase from the stored
    advantages (the same run killed and resumed from the command line: test_reliability.py)."""
    run_dir, out, compiled = tiny_runs("chunk_awr")
    assert compiled["jit(update)"] == 2 and compiled.get("jit(_finite)", 0) <= 1, compiled  # jit once (test_acrlpd_pi0)
    assert out["step"] == 20 and 0.0 <= out["eval/success_rate"] <= 1.0
    rows = _metrics(run_dir)
    losses = [r[k] for r in rows for k in ("losses/q", "losses/v", "losses/policy") if k in r]
    assert losses and all(math.isfinite(x) for x in losses) and max(r["step"] for r in rows) == 20
    assert any("losses/policy" in r for r in rows) and os.path.isdir(os.path.join(run_dir, "checkpoints"))
    # --ema-decay 0.8: θ̄ is evaluated and exported, θ evaluated too (--eval-raw)
    assert all("eval/raw_success_rate" in r for r in rows if "eval/success_rate" in r)
    state = tiny.last_state(run_dir)
    assert not np.allclose(state["ema"]["state_proj"]["kernel"], state["params"]["state_proj"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, openpi.load_pi0(run_dir, 5)[0], state["ema"])


def test_check():
    bad = subprocess.run(
        [sys.executable, "chunk_awr.py", "--schedule", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert bad.returncode != 0 and "--schedule" in bad.stderr
    with pytest.raises(ValueError, match="--reward subgoal is the TD target's chunk reward"):
        chunk_awr.check(chunk_awr.Args(reward="subgoal"))  # the Monte Carlo target would ignore it


def _episodes(flags: list[list[int]], terminal_last: list[bool]) -> data.EpisodeData:
    lengths = np.array([len(f) for f in flags])
    n = int(lengths.sum())
    terms = np.concatenate(
        [np.eye(1, k, k - 1, dtype=bool)[0] & t for k, t in zip(lengths, terminal_last, strict=True)]
    )
    return data.EpisodeData(
        obs={"state": np.zeros((n, 10), np.float32), "prompt_id": np.zeros(n, np.int32), "images": {}},
        actions=np.zeros((n, 2), np.float32),
        rewards=terms.astype(np.float32),
        terminals=terms,
        subgoal=np.concatenate([np.asarray(f, bool) for f in flags]),
        episode_starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]),
        episode_lengths=lengths,
        truncated=~np.asarray(terminal_last),
        prompts=["push the block to the red target"],
    )


def test_subgoal_reward_hand_made_episode():
    # episode 0: 7 steps, sub-goal completed at step 3, terminates at step 6; episode 1: 4 steps, flag on its 1st
    episodes = _episodes([[0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0]], [True, False])
    chunks = data.make_chunks(episodes, horizon=3, gamma=0.9)
    batch = chunks.get(np.arange(len(chunks)))
    r = np.asarray(chunk_awr.chunk_reward(batch, "subgoal"))
    # chunk t covers steps t..t+2 of its episode: only chunks containing step 3 of episode 0 (t = 1, 2, 3) and the
    # chunk starting at episode 1's first step see a flag; no flag leaks across the episode boundary
    np.testing.assert_array_equal(r, [0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0])
    ret = np.asarray(chunk_awr.chunk_reward(batch, "return"))
    np.testing.assert_allclose(ret[4:7], [0.81, 0.9, 1.0], rtol=1e-6)  # termination reward at step 6, discounted
    assert ret[7:].sum() == 0


def test_weight_clipping():
    adv = jnp.array([-1.0, 0.0, 0.1, 1.0, 100.0])
    w = np.asarray(chunk_awr.awr_weights(adv, beta=20.0, max_weight=100.0))
    np.testing.assert_allclose(w, [math.exp(-20), 1.0, math.exp(2.0), 100.0, 100.0], rtol=1e-5)
    assert np.all(np.isfinite(w)) and w.max() <= 100.0
    np.testing.assert_array_equal(np.asarray(chunk_awr.awr_weights(adv, 0.0, 100.0)), np.ones(5))  # β = 0
    g = jax.grad(lambda a: chunk_awr.awr_weights(a, 20.0, 100.0).sum())(adv)  # the weights carry no gradient
    np.testing.assert_array_equal(np.asarray(g), np.zeros(5))


def _setup(beta: float):
    args = chunk_awr.check(chunk_awr.Args(beta=beta))
    env = envs.make_env("push", 1)
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=5)
    model = pi0.Pi0(cfg)
    stats = {
        k: {s: np.full(d, v, np.float32) for s, v in (("mean", 0.1), ("std", 0.5), ("q01", -1), ("q99", 1))}
        for k, d in (("state", 10), ("actions", 2))
    }
    table = pi0.make_prompt_table(env.prompts, pi0.BuiltinTokenizer(cfg.max_token_len, cfg.vocab_size))
    nets = chunk_awr.Nets(model, pi0.EnvIO(cfg, table, stats, 2), chunk_awr.MLP((16,)), chunk_awr.MLP((16,)))
    x = jnp.zeros((1, cfg.vlm.width + 10 + 10))
    q = jax.vmap(lambda k: nets.q.init(k, x)["params"])(jax.random.split(jax.random.key(1), 2))
    v = nets.v.init(jax.random.key(2), jnp.zeros((1, cfg.vlm.width + 10)))["params"]
    train = {"params": model.init(jax.random.key(0)), "critic": {"q": q, "v": v, "target_q": q}}
    rng = np.random.default_rng(0)
    batch = {
        "obs": {
            "state": rng.normal(size=(6, 10)).astype(np.float32),
            "prompt_id": np.array([0, 1, 2] * 2),
            "images": {},
        },
        "actions": rng.uniform(-1, 1, (6, 5, 2)).astype(np.float32),
        "valid": np.array([[1] * 5] * 4 + [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool),
        "adv": rng.normal(size=6).astype(np.float32) * 0.3,
        "return_to_go": rng.uniform(size=6).astype(np.float32),
    }
    return nets, args, train, batch


def test_beta_zero_is_exactly_bc():
    nets, args, train, batch = _setup(beta=0.0)
    rng = jax.random.key(7)
    # the AWR update's own code path
    _, info = chunk_awr.total_loss(train, batch, rng, train["params"], "policy", nets, args)
    k_pi, _ = jax.random.split(rng)
    obs = nets.io.observe(batch["obs"])
    per_step = nets.pi.flow_loss(train["params"], obs, nets.io.to_model(batch["actions"]), k_pi)  # [B,H]
    valid = batch["valid"].astype(np.float32)
    bc = float((per_step * valid).sum() / valid.sum())
    assert float(info["losses/policy"]) == pytest.approx(bc, rel=1e-6)
    assert float(info["charts/weight_mean"]) == 1.0 and float(info["charts/weight_max"]) == 1.0
    # with β > 0 the same batch gives a different (weighted) loss
    nets2, args2, train2, _ = _setup(beta=20.0)
    _, info2 = chunk_awr.total_loss(train2, batch, rng, train2["params"], "policy", nets2, args2)
    assert float(info2["losses/policy"]) != pytest.approx(bc, rel=1e-4)


def test_the_average_of_pi0s_weights_follows_each_policy_update():
    """θ̄ ← d·θ̄ + (1 − d)·θ after every π₀ update (θ the updated weights), untouched by the critic's updates; what
    acts (`acting_params`) is θ̄, or θ when no average is kept."""
    nets, args, train, batch = _setup(beta=1.0)
    args = dataclasses.replace(args, ema_decay=0.9)
    tx, critic_tx = chunk_awr.make_optimizers(args)
    params, critic = train["params"], {k: train["critic"][k] for k in ("q", "v")}
    ema = jax.tree.map(lambda x: x + 0.5, params)  # an average away from θ
    state = {"params": params, "opt": tx.init(params), "critic": critic, "critic_opt": critic_tx.init(critic)}
    state.update(target_critic=train["critic"]["target_q"], adv=jnp.zeros(6), ema=ema)
    updates = chunk_awr.make_update(nets, args, tx, critic_tx, None)
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], batch)  # one update: [1,B,...]
    copy = lambda tree: jax.tree.map(np.array, tree)  # the update donates its input state
    before = copy(state)
    after, _ = updates["policy"](jax.tree.map(jnp.asarray, before), stacked, jax.random.key(3))
    assert not np.allclose(after["params"]["state_proj"]["kernel"], before["params"]["state_proj"]["kernel"])
    want = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before["ema"], after["params"])
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), after["ema"], want)
    jax.tree.map(np.testing.assert_array_equal, chunk_awr.acting_params(after), after["ema"])
    critic_step, _ = updates["critic"](jax.tree.map(jnp.asarray, before), stacked, jax.random.key(3))
    jax.tree.map(np.testing.assert_array_equal, critic_step["ema"], before["ema"])
    assert chunk_awr.acting_params({**before, "ema": {}}) is before["params"]


def test_twin_critics_are_two_networks_read_in_pi0_action_form():
    """Q is two independently initialised critics (min of the targets for Q̄), and reads the chunk as π₀ predicts it:
    EnvIO.to_model with the state (relative on delta dims), the form of the chunks π₀ samples for the value target."""
    nets, args, train, batch = _setup(beta=1.0)
    q = train["critic"]["q"]
    assert not np.allclose(q["Dense_0"]["kernel"][0], q["Dense_0"]["kernel"][1])  # two trunks, not two outputs
    prefix = nets.pi.prefix(train["params"], nets.io.observe(batch["obs"]))
    z = chunk_awr.critic_obs(prefix.features, prefix.state)
    chunks = nets.io.executed(nets.io.to_model(batch["actions"], batch["obs"]["state"]))
    qs = chunk_awr.q_values(nets, q, z, chunks)  # [2,B]
    assert qs.shape == (2, 6) and not np.allclose(qs[0], qs[1])
    _, info = chunk_awr.total_loss(train, batch, jax.random.key(0), train["params"], "critic", nets, args)
    want = float(jnp.mean(jnp.square(qs - batch["return_to_go"][None])))  # Monte Carlo target, both members
    assert float(info["losses/q"]) == pytest.approx(want, rel=1e-5)


def test_mc_target_bootstraps_past_a_time_limit():
    """With a truncated episode's last frame in the batch, y = (return_to_end + end_discount · (μ + σ V(x_end)) − μ)/σ:
    the value of o_{L−1} in reward units replaces the repeated last reward; rows that end in success (discount 0)
    keep their return. return_to_go is not read."""
    nets, args, train, batch = _setup(beta=1.0)
    nets = dataclasses.replace(nets, ret_mu=-0.4, ret_sigma=2.5)  # critic units differ from reward units
    rng = np.random.default_rng(1)
    end_obs = {k: v[::-1].copy() for k, v in batch["obs"].items() if k != "images"} | {"images": {}}
    batch = batch | {"end_obs": end_obs, "return_to_go": np.full(6, np.nan, np.float32)}
    batch["return_to_end"] = rng.uniform(-2, 0, 6).astype(np.float32)
    batch["end_discount"] = np.array([0.9, 0.5, 0.0, 0.0, 0.3, 1.0], np.float32)
    _, info = chunk_awr.total_loss(train, batch, jax.random.key(0), train["params"], "critic", nets, args)
    params, critic = train["params"], train["critic"]
    prefix = nets.pi.prefix(params, nets.io.observe(batch["obs"]))
    z = chunk_awr.critic_obs(prefix.features, prefix.state)
    end = nets.pi.prefix(params, nets.io.observe(end_obs))
    v_end = chunk_awr.value(nets, critic["v"], chunk_awr.critic_obs(end.features, end.state))  # [B]
    mu, sigma = nets.ret_mu, nets.ret_sigma
    y = (batch["return_to_end"] + batch["end_discount"] * (mu + sigma * v_end) - mu) / sigma
    chunk = nets.io.executed(nets.io.to_model(batch["actions"], batch["obs"]["state"]))
    qs = chunk_awr.q_values(nets, critic["q"], z, chunk)  # [2,B]
    assert np.isfinite(float(info["losses/q"]))
    assert float(info["losses/q"]) == pytest.approx(float(jnp.mean(jnp.square(qs - y[None]))), rel=1e-5)
    assert float(info["charts/y"]) == pytest.approx(float(y.mean()), rel=1e-5)


def test_flow_log_prob_exact_vs_hutchinson():
    nets, _, train, batch = _setup(beta=1.0)
    params = train["params"]
    prefix = nets.pi.prefix(params, nets.io.observe(batch["obs"]))
    noise = jax.random.normal(jax.random.key(3), (6, 2, 5, 2))
    a_ex, lp_ex = nets.pi.sample_logp(params, prefix, noise, 3, jax.random.key(4), False)
    hutch = jax.jit(jax.vmap(lambda k: nets.pi.sample_logp(params, prefix, noise, 3, k, True)[1]))(
        jax.random.split(jax.random.key(5), 64)
    )
    np.testing.assert_allclose(a_ex, nets.pi.sample(params, prefix, noise, 3), atol=1e-5)
    assert np.all(np.isfinite(lp_ex)) and np.all(np.isfinite(hutch))
    se = np.asarray(hutch).std(0) / 8.0  # standard error of the 64-sample mean
    assert np.all(np.abs(np.asarray(hutch).mean(0) - lp_ex) < 4 * se + 1e-3)
