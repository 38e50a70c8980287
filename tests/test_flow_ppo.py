"""flow_ppo.py: smoke for both noise methods, ratio = 1 before the first update, GAE against
a plain loop with terminations and truncations, and the chain log-likelihood against the Gaussian density by hand."""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import flow_ppo as fp
from common import openpi, pi0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    bc_steps=3,
    bc_batch_size=8,
    iterations=2,
    num_envs=4,
    num_steps=2,
    update_epochs=1,
    num_minibatches=2,
    eval_episodes=4,
    log_every=1,
    eval_every=2,
    save_every=2,
    critic_warmup=1,
    flow_steps=2,
)


def test_smoke_and_ratio(tmp_path, tiny_runs):
    """BC, then PPO with flow_sde, the backbone trained (the same run killed and resumed from the command line:
    test_reliability.py; flow_noise: below)."""
    run_dir, out, compiled = tiny_runs("flow_ppo")
    assert (compiled["jit(update)"], compiled["jit(ppo_update)"]) == (1, 1) and compiled.get("jit(_finite)", 0) <= 1
    for k in ("losses/policy", "losses/value", "losses/entropy", "losses/approx_kl", "charts/noise_std"):
        assert np.isfinite(out[k]), k
    # the stored and the recomputed chain log-likelihood come from the same function: ratio 1 before any update
    assert out["charts/first_ratio_dev_max"] < 1e-5
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/success_rate" in r]
    assert evals[0]["step"] == tiny.FLOW_PPO["bc_steps"] and "eval/start_success_rate" in out  # the BC start first
    assert any("time/sps" in r for r in rows) and os.path.isdir(os.path.join(run_dir, "checkpoints"))
    assert rows[-1]["step"] == tiny.FLOW_PPO["bc_steps"] + tiny.FLOW_PPO["iterations"]
    state = tiny.last_state(run_dir)  # BC's average θ̄ started PPO, which keeps none: what PPO trained is exported
    assert not state["ema"]
    jax.tree.map(np.testing.assert_array_equal, openpi.load_pi0(run_dir, 5)[0], state["params"])
    # PPO from that run's π₀ (no BC steps: no BC optimizer state, 26 GB at full size), saved and resumed
    ppo_dir = str(tmp_path / "ppo")
    more = dict(tiny.FLOW_PPO, iterations=1, eval_every=1)
    out = fp.main(fp.Args(**more, pi0_checkpoint=run_dir, run_dir=ppo_dir))
    assert out["step"] == 1 and out["iterations"] == 1 and np.isfinite(out["losses/policy"])
    with open(os.path.join(ppo_dir, "checkpoints", "1", "state", "_METADATA")) as f:
        assert "('bc_opt', " not in f.read()  # no array under bc_opt (orbax notes the empty dict)
    assert fp.main(fp.Args(run_dir=ppo_dir, resume=True))["step"] == 1  # restored: nothing left to do


def test_gae_against_loop():
    rng = np.random.default_rng(0)
    T, E, g, lam = 7, 3, 0.9, 0.8
    r, v, final_v = rng.normal(size=(T, E)), rng.normal(size=(T, E)), rng.normal(size=(T, E))
    last_v = rng.normal(size=E)
    term, trunc = np.zeros((T, E)), np.zeros((T, E))
    term[2, 0], term[5, 1], trunc[3, 0], trunc[1, 2], trunc[6, 1] = 1, 1, 1, 1, 1
    adv, ret = fp.gae(*(jnp.asarray(x, jnp.float32) for x in (r, v, last_v, term, trunc, final_v)), g, lam)
    want = np.zeros((T, E))
    for e in range(E):
        a = 0.0
        for t in reversed(range(T)):
            if term[t, e]:  # episode over: no bootstrap, the trace restarts
                delta, a = r[t, e] - v[t, e], 0.0
            elif trunc[t, e]:  # time limit: bootstrap from the final observation's value, the trace restarts
                delta, a = r[t, e] + g * final_v[t, e] - v[t, e], 0.0
            else:
                delta = r[t, e] + g * (v[t + 1, e] if t + 1 < T else last_v[e]) - v[t, e]
            a = delta + g * lam * a
            want[t, e] = a
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want + v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ramp", [0, 2])
def test_policy_adam_skips_the_value_warmup(ramp):
    """The value-only warm-up leaves the policy's Adam untouched, so its first policy step is a fresh Adam's (±lr per
    coordinate; ±lr/n under a ramp of n Adam steps, which counts from there). Counted, the warm-up's 200 zero-gradient
    steps made that step ~1.35× and the next ~2.8×."""
    labels = lambda params, label, freeze: jax.tree.map(lambda _: label, params)
    nets = fp.Nets(types.SimpleNamespace(optimizer_labels=labels), None, None, None)
    train = {"params": {"w": jnp.zeros(64)}, "heads": {"noise": {"b": jnp.zeros(4)}, "value": {"v": jnp.zeros(8)}}}
    lr = 1e-3
    args = fp.Args(lr=lr, lr_ramp=ramp, max_grad_norm=1e9)
    tx, _ = fp.make_optimizers(args, nets, train)
    update, opt = jax.jit(tx.update), tx.init(train)
    rng = np.random.default_rng(0)
    draw = lambda: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 1e-2, jnp.float32), train)
    for _ in range(200):  # warm-up: only the value head has gradients
        g = draw()
        g = {"params": jax.tree.map(jnp.zeros_like, g["params"]), "heads": {**g["heads"], "noise": {"b": jnp.zeros(4)}}}
        u, opt = update(g, opt, train, train_policy=jnp.bool_(False))
        assert not np.any(u["params"]["w"]) and not np.any(u["heads"]["noise"]["b"])
        assert np.all(u["heads"]["value"]["v"] != 0)
    g = draw()
    u, _ = update(g, opt, train, train_policy=jnp.bool_(True))
    first = lr / (ramp * args.update_epochs * args.num_minibatches) if ramp else lr
    for got, grad in ((u["params"]["w"], g["params"]["w"]), (u["heads"]["noise"]["b"], g["heads"]["noise"]["b"])):
        np.testing.assert_allclose(got, -first * grad / (np.abs(grad) + 1e-5), rtol=1e-4)  # Adam's first step


def setup(method: str, K: int, reduce: str = "sum"):
    args = fp.Args(noise_method=method, flow_steps=K, logprob_reduce=reduce)
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=5)
    model = pi0.Pi0(cfg)
    params = model.init(jax.random.key(0))
    noise_head = fp.NoiseHead(2, args.min_std, args.max_std)
    heads = {"noise": noise_head.init(jax.random.key(1), jnp.zeros((1, 1, 5, cfg.expert.width)))}
    nets = fp.Nets(model, None, noise_head, fp.ValueHead())
    o = model.dummy_observation(3)
    o = o.replace(tokens=o.tokens.at[:, 1].set(5), state=jax.random.normal(jax.random.key(2), o.state.shape))
    prefix = model.prefix(params, o)
    chain = jax.random.normal(jax.random.key(3), (3, K + 1, 5, 2))
    return args, nets, params, heads, prefix, chain


ALL = jnp.ones((5, 2))  # every step and dim of the chunk is executed


def log_normal(x, mean, std):
    """The Gaussian density written out: Π_i exp(−(x_i − μ_i)² / 2σ_i²) / √(2π σ_i²), as a log."""
    x, mean, std = (np.asarray(a, np.float64) for a in np.broadcast_arrays(x, mean, std))
    return np.sum(-((x - mean) ** 2) / (2 * std**2) - np.log(np.sqrt(2 * math.pi * std**2)), axis=(-2, -1))


def test_one_step_chain_logprob_by_hand():
    args, nets, params, heads, prefix, chain = setup("flow_noise", K=1)
    logp, entropy, _ = fp.chain_logprob(nets, args, params, heads, prefix, chain, jnp.zeros(3, jnp.int32), ALL)
    v, out = nets.pi.velocity(params, prefix, chain[:, :1], jnp.ones((3, 1)))  # one Euler step from t=1, δ=1
    std = nets.noise_head.apply(heads["noise"], out)[:, 0]
    want = log_normal(chain[:, 0], 0.0, 1.0) + log_normal(chain[:, 1], chain[:, 0] - v[:, 0], std)
    np.testing.assert_allclose(logp, want, rtol=1e-5)
    assert (std >= args.min_std).all() and (std <= args.max_std).all()
    np.testing.assert_allclose(
        entropy, np.mean(0.5 * np.log(2 * np.pi * np.e * np.asarray(std) ** 2), (1, 2)), rtol=1e-5
    )
    args_mean = fp.Args(noise_method="flow_noise", flow_steps=1, logprob_reduce="mean")
    logp_mean, _, _ = fp.chain_logprob(nets, args_mean, params, heads, prefix, chain, jnp.zeros(3, jnp.int32), ALL)
    np.testing.assert_allclose(logp_mean, want / 2, rtol=1e-5)


def test_sde_step_logprob_by_hand():
    args, nets, params, heads, prefix, chain = setup("flow_sde", K=2)
    step = jnp.array([0, 1, 1])
    logp, _, _ = fp.chain_logprob(nets, args, params, heads, prefix, chain, step, ALL)
    a, delta = args.sde_noise_level, 0.5
    t = 1.0 - np.asarray(step) * delta  # [B]
    x = chain[jnp.arange(3), step]  # [B,H,A]
    v = np.asarray(nets.pi.velocity(params, prefix, x[:, None], jnp.asarray(t, jnp.float32)[:, None])[0][:, 0])
    for b in range(3):
        ts = min(t[b], 1 - delta)  # σ_t = a √(t / (1 − t)), with t clipped to 1 − δ at the first step
        sigma = a * math.sqrt(ts / (1 - ts))
        xb = np.asarray(x[b], np.float64)
        mean = xb - delta * (v[b] + sigma**2 / (2 * t[b]) * (xb + (1 - t[b]) * v[b]))  # drift corrected by the score
        want = log_normal(chain[b, int(step[b]) + 1], mean, sigma * math.sqrt(delta))
        np.testing.assert_allclose(logp[b], want, rtol=1e-5)


@pytest.mark.parametrize("method", ["flow_noise", "flow_sde"])
def test_chain_logprob_counts_only_the_executed_part(method):
    """With π₀'s chunk longer than the executed one (--model-horizon), or action dims padded beyond the env's, what
    never reaches the env must not enter the likelihood ratio: changing it leaves log π unchanged."""
    args, nets, params, heads, prefix, chain = setup(method, K=2)
    mask = jnp.zeros((5, 2)).at[:3, :1].set(1.0)  # 3 of 5 steps executed, 1 of 2 dims is the env's
    step = jnp.array([0, 1, 1])
    logp, entropy, std = fp.chain_logprob(nets, args, params, heads, prefix, chain, step, mask)
    # only the last denoising state's discarded part changes (earlier ones feed the velocity of the kept part too)
    changed = chain.at[:, -1, 3:].add(5.0).at[:, -1, :, 1:].add(-3.0)
    logp2, _, _ = fp.chain_logprob(nets, args, params, heads, prefix, changed, step, mask)
    np.testing.assert_allclose(logp2, logp, rtol=1e-6)
    full, _, _ = fp.chain_logprob(nets, args, params, heads, prefix, changed, step, ALL)
    assert np.all(np.abs(np.asarray(full) - np.asarray(logp)) > 1e-3) and np.isfinite(entropy).all()
