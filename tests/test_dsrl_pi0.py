"""dsrl_pi0.py: in-process smoke (both critics, online from a run folder), SAC's target by hand, the noise policy's
log-density by the change of variables, the distillation of Q^W onto Q^A, the prior data's cached pairs."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import tiny
from conftest import host_file

import dsrl_pi0 as ds
from common import RunError, data, envs, openpi, pi0, runlog


def test_smoke(tmp_path, tiny_runs):
    """BC then DSRL-NA online in-process (killed and resumed from the command line: test_reliability.py), then DSRL-SAC
    online only from that run folder's π₀."""
    run_dir, out, compiled = tiny_runs("dsrl_pi0")
    assert compiled["jit(update)"] == 2 and compiled.get("jit(_finite)", 0) <= 1, compiled  # jit once (test_acrlpd_pi0)
    assert out["step"] == tiny.DSRL["offline_steps"] + tiny.DSRL["online_steps"]
    for k in ("losses/critic", "losses/noise_critic", "losses/actor", "losses/alpha", "charts/q_target"):
        assert np.isfinite(out[k]), k  # the online SAC update
    for key in ("offline/eval/success_rate", "online/eval/plain_success_rate", "final/eval/q_gap"):
        assert key in out
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert any(np.isfinite(r.get("losses/bc", np.nan)) for r in rows)  # the BC phase
    z = host_file(run_dir)  # acting's cache per transition: 1 warm-up step + 4 steps of 2 envs
    n, M = 2 * 5, tiny.DSRL["alias_n"]
    assert z["buffer/extras/obs_z"].shape == (n, 64 + 10) and z["buffer/extras/noise"].shape == (n, 5, 2)
    assert z["buffer/extras/alias_noise"].shape == (n, M, 5, 2) and z["buffer/extras/alias_chunk"].shape == (n, M, 5, 2)
    np.testing.assert_array_equal(z["buffer/extras/alias_noise"][:, 0], z["buffer/extras/noise"])  # executed first
    np.testing.assert_array_equal(z["buffer/extras/alias_chunk"][:, 0], z["buffer/extras/chunk"])
    assert np.abs(z["buffer/extras/noise"]).max() < tiny.DSRL["noise_scale"]  # the noise policy's range
    assert not any(k.startswith(("buffer/obs/", "buffer/next_obs/")) for k in z)  # the updates read only the cache
    assert os.path.exists(os.path.join(run_dir, "alias_cache.p0.npz"))  # the prior data's pairs (--online-fraction)
    # θ̄ of BC is the π₀ that is steered and exported
    state = tiny.last_state(run_dir)
    assert not np.allclose(state["ema"]["action_out_proj"]["kernel"], state["params"]["action_out_proj"]["kernel"])
    jax.tree.map(
        np.testing.assert_array_equal, openpi.load_pi0(run_dir, 5)[0], pi0.overlaid(state["params"], state["ema"])
    )

    # the export: π₀ (θ̄) as an openpi checkpoint, and the noise policy beside it
    exported = str(tmp_path / "export")
    assert "noise policy" in openpi.main(openpi.Args(run_dir, exported))
    jax.tree.map(np.testing.assert_array_equal, openpi.load_pi0(exported, 5)[0], openpi.load_pi0(run_dir, 5)[0])
    with np.load(os.path.join(exported, "noise_policy.npz")) as f:
        weights = {k: f[k] for k in f.files}
    want = runlog._flatten(state["actor"])
    assert weights.keys() == want.keys() and all(np.array_equal(weights[k], want[k]) for k in want)
    about = json.load(open(os.path.join(exported, "noise_policy.json")))
    assert about["noise_scale"] == tiny.DSRL["noise_scale"] and about["action_horizon"] == 5

    # online only, --critic noise: π₀ from that run folder, no prior data, no BC phase, no θ̄
    online_dir = str(tmp_path / "online")
    flags = {k: v for k, v in tiny.DSRL.items() if k not in ("offline_steps", "online_fraction", "critic")}
    out = ds.main(ds.Args(**flags, critic="noise", pi0_checkpoint=run_dir, run_dir=online_dir))
    assert out["step"] == tiny.DSRL["online_steps"] and "start/eval/success_rate" in out
    assert np.isfinite(out["losses/noise_critic"]) and "losses/critic" not in out  # Q^W by TD, no Q^A
    assert json.load(open(os.path.join(online_dir, "args.json")))["offline_steps"] == 0
    state = tiny.last_state(online_dir)
    assert state["ema"] == {} and state["critic"] == {}
    jax.tree.map(np.testing.assert_array_equal, openpi.load_pi0(online_dir, 5)[0], openpi.load_pi0(run_dir, 5)[0])
    assert "buffer/extras/alias_noise" not in host_file(online_dir)


def make_nets(**kw):
    args = ds.check(ds.Args(**{**tiny.DSRL, "offline_steps": 0, **kw}))
    env = envs.make_env("push", 2)
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=5)
    model = pi0.Pi0(cfg)
    unit = lambda d: {
        "mean": np.zeros(d, np.float32),
        "std": np.ones(d, np.float32),
        "q01": -np.ones(d, np.float32),
        "q99": np.ones(d, np.float32),
    }
    table = pi0.make_prompt_table(env.prompts, pi0.BuiltinTokenizer(cfg.max_token_len, cfg.vocab_size))
    io = pi0.EnvIO(cfg, table, {"state": unit(10), "actions": unit(2)}, 2, horizon=args.action_horizon)
    D = args.action_horizon * 2
    nets = ds.Nets(model, io, ds.Critic((16,)), ds.NoisePolicy((16,), D))
    z0 = jnp.zeros((1, 64 + 10))
    q = lambda k, d: jax.vmap(lambda k: nets.critic.init(k, jnp.zeros((1, 74 + d)))["params"])(jax.random.split(k, 3))
    train = {"critic": q(jax.random.key(1), args.action_horizon * 2), "noise_critic": q(jax.random.key(2), D)}
    train.update(actor=nets.actor.init(jax.random.key(3), z0)["params"], log_alpha=jnp.log(jnp.float32(0.3)))
    target = {"critic": q(jax.random.key(4), args.action_horizon * 2), "noise_critic": q(jax.random.key(5), D)}
    return nets, args, model.init(jax.random.key(0)), train, target, env


def member(nets, tree, e, x):
    """One ensemble member's values of inputs x [B,F]."""
    return np.asarray(nets.critic.apply({"params": jax.tree.map(lambda p: p[e], tree)}, x))


def test_sac_target_by_hand():
    for agg in ("mean", "min2"):
        nets, args, _, train, target, _ = make_nets(q_agg=agg)
        mu, sigma = 0.3, 2.0  # Q in critic units, (return − μ) / σ
        nets = dataclasses.replace(nets, ret=(mu, sigma))
        next_z = jax.random.normal(jax.random.key(6), (2, 74))
        batch = {
            "discounted_return": jnp.array([0.5, 0.0]),
            "n_valid": jnp.array([5, 2]),
            "mask": jnp.array([1.0, 0.0]),
            "next_obs_z": next_z,
        }
        rng = jax.random.key(3)
        y, _ = ds.td_target(train, target, batch, rng, nets, args)
        # by hand: w′ = s·tanh(mean + std·ε) with the key's ε, log π^W by the tanh change of variables per dim
        k_w, k_pair = jax.random.split(rng)
        mean, log_std = (np.asarray(x) for x in nets.actor.apply({"params": train["actor"]}, next_z))
        eps = np.asarray(jax.random.normal(k_w, mean.shape))
        u = mean + np.exp(log_std) * eps
        s = args.noise_scale
        logp = (-0.5 * eps**2 - log_std - 0.5 * np.log(2 * np.pi) - np.log(s * (1 - np.tanh(u) ** 2))).sum(1)
        x = np.concatenate([np.asarray(next_z), s * np.tanh(u)], -1)
        q_t = np.stack([member(nets, target["noise_critic"], e, x) for e in range(3)])  # the TARGET noise critic
        if agg == "mean":
            q_bar = q_t.mean(0)
        else:
            pair = np.asarray(jax.random.choice(k_pair, 3, (2,), replace=False))
            q_bar = q_t[pair].min(0)
        v = q_bar - 0.3 * logp  # soft value, α = 0.3
        back = np.array([args.gamma**5, args.gamma**2]) * np.array([1.0, 0.0]) * (mu + sigma * v)  # reward units
        want = (np.array([0.5, 0.0]) + back - mu) / sigma
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
        assert abs(want[1] + mu / sigma) < 1e-6  # a terminated chunk does not bootstrap: its return, 0, in critic units


def test_noise_policy_log_density():
    """log π^W(w | o) of `sample_noise` against the density of w = s·tanh(u), u ~ N(mean, std²), computed apart in
    float64 (|u| reaches 6.5 here, where float32's 1 − tanh²u has lost its digits): the Gaussian's log-density of u
    minus log |det ∂w/∂u| from the full Jacobian by central differences; and a 1-D policy's density integrates to 1
    over (−s, s)."""
    nets, args, _, train, _, _ = make_nets(noise_scale=1.7)
    z = jax.random.normal(jax.random.key(7), (3, 74))
    w, logp = ds.sample_noise(nets, train["actor"], z, jax.random.key(8), args.noise_scale)
    assert w.shape == (3, 5, 2) and np.abs(np.asarray(w)).max() < 1.7
    mean, log_std = nets.actor.apply({"params": train["actor"]}, z)
    eps = np.asarray(jax.random.normal(jax.random.key(8), mean.shape), np.float64)  # the reparameterisation's ε
    mean64, std64 = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
    u = mean64 + std64 * eps  # [B,D]
    np.testing.assert_allclose(np.asarray(w).reshape(3, -1), 1.7 * np.tanh(u), atol=1e-6)
    for b in range(3):
        gauss = scipy.stats.norm.logpdf(u[b], mean64[b], std64[b]).sum()
        h = 1e-6 * np.eye(u.shape[1])
        jac = np.stack([(1.7 * np.tanh(u[b] + e) - 1.7 * np.tanh(u[b] - e)) / 2e-6 for e in h], 1)  # [D,D]
        want = gauss - np.linalg.slogdet(jac)[1]
        np.testing.assert_allclose(float(logp[b]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        ds.mean_noise(nets, train["actor"], z, 1.7).reshape(3, -1), 1.7 * np.tanh(mean), atol=1e-6
    )
    # one dim: the density of w over a fine grid of (−s, s) sums to 1 (w and log π from the same map, ε per point)
    grid = jnp.linspace(-1.7, 1.7, 40_001)[1:-1]
    m, ls = jnp.float32(0.4), jnp.float32(-0.3)
    eps = (jnp.arctanh(grid / 1.7) - m) / jnp.exp(ls)  # the ε that gives each w
    w1, logp1 = ds.squash(jnp.full((grid.size, 1), m), jnp.full((grid.size, 1), ls), eps[:, None], 1.7)
    np.testing.assert_allclose(np.asarray(w1[:, 0]), np.asarray(grid), atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp1)) * (grid[1] - grid[0])), 1.0, atol=2e-3)


def test_distillation_regresses_q_w_onto_q_a():
    """--critic aliased: Q^W's loss is the squared gap to Q^A's ensemble mean at the noise-chunk pairs, a constant:
    its gradient reaches Q^W and never Q^A through the teacher."""
    nets, args, _, train, _, _ = make_nets()
    B, M = 2, args.alias_n
    batch = {
        "obs_z": jax.random.normal(jax.random.key(1), (B, 74)),
        "chunk": jax.random.normal(jax.random.key(2), (B, 5, 2)),
        "alias_noise": jax.random.normal(jax.random.key(3), (B, M, 5, 2)),
        "alias_chunk": jax.random.normal(jax.random.key(4), (B, M, 5, 2)),
    }
    y = jnp.array([0.2, -0.1])
    _, info = ds.critic_loss(train, batch, y, nets, args)
    z = np.asarray(batch["obs_z"])
    flat = lambda x, m: np.concatenate([z, np.asarray(x)[:, m].reshape(B, -1)], -1)
    teacher = np.stack(
        [[member(nets, train["critic"], e, flat(batch["alias_chunk"], m)) for m in range(M)] for e in range(3)]
    )
    student = np.stack(
        [[member(nets, train["noise_critic"], e, flat(batch["alias_noise"], m)) for m in range(M)] for e in range(3)]
    )
    want = np.mean((student - teacher.mean(0)[None]) ** 2)
    np.testing.assert_allclose(float(info["losses/noise_critic"]), want, rtol=1e-5)
    td = np.stack(
        [
            member(nets, train["critic"], e, np.concatenate([z, np.asarray(batch["chunk"]).reshape(B, -1)], -1))
            for e in range(3)
        ]
    )
    np.testing.assert_allclose(float(info["losses/critic"]), np.mean((td - np.asarray(y)) ** 2), rtol=1e-5)
    # the distillation's gradient w.r.t. Q^A is zero: only the TD term moves Q^A
    g_all = jax.grad(lambda c: ds.critic_loss({**train, "critic": c}, batch, y, nets, args)[0])(train["critic"])
    td_only = lambda c: jnp.mean(jnp.square(ds.q_values(nets, c, batch["obs_z"], batch["chunk"][:, None])[:, :, 0] - y))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_all, jax.grad(td_only)(train["critic"]))


def test_prior_rows_from_the_cache(tmp_path):
    """--critic aliased with --online-fraction < 1: prior rows carry the once-encoded views of o_t and o_{t+H}, the
    data chunk, and π₀'s noise-chunk pairs at o_t (kept in the run folder: a resumed run reads the same pairs)."""
    nets, args, params, *_, env = make_nets(online_fraction=0.5)
    episodes = data.load_episodes(envs.default_dataset(env="push", noise=0.6, episodes=12), prompts=env.prompts)
    offline = data.make_chunks(episodes, 5, 0.99)
    buffer = data.ReplayBuffer(16, 5, 0.99)
    run = runlog.Run(dataclasses.replace(args, run_dir=str(tmp_path / "run")), "dsrl_pi0")
    sample = ds.online_batches(nets, args, params, offline, buffer, run, jax.random.key(0), bs=64)
    n = len(offline)
    rows = sample(np.random.default_rng(0), n)  # an empty buffer: every row from the prior data
    i = np.random.default_rng(0).integers(0, n, n)
    M = args.alias_n
    assert rows["alias_noise"].shape == (n, M, 5, 2) and rows["alias_chunk"].shape == (n, M, 5, 2)
    z = np.asarray(ds.encode(nets, args, params, episodes.obs, jax.random.key(1), views_only=True))
    np.testing.assert_allclose(rows["obs_z"], z[offline.obs_idx[i]], atol=1e-5)
    np.testing.assert_allclose(rows["next_obs_z"], z[offline.next_obs_idx[i]], atol=1e-5)
    # each pair is π₀'s chunk from that noise at that frame
    f = offline.obs_idx[i[:3]]
    prefix = nets.pi.prefix(params, nets.io.observe(data.gather_obs(episodes.obs, f)))
    want = nets.io.executed(ds.steered(nets, params, prefix, jnp.asarray(rows["alias_noise"][:3]), args.flow_steps))
    np.testing.assert_allclose(rows["alias_chunk"][:3], np.asarray(want), atol=1e-4)
    assert os.path.exists(os.path.join(run.dir, "alias_cache.p0.npz"))
    again = ds.online_batches(nets, args, params, offline, buffer, run, jax.random.key(5), bs=64)
    np.testing.assert_array_equal(again(np.random.default_rng(0), n)["alias_noise"], rows["alias_noise"])
    run.close()


def test_inconsistent_flags_refused_in_one_line(tmp_path):
    """Flags that cannot work together stop in check(), before any work, with the flag and the fix."""
    cases = [
        (dict(critic="noise", online_fraction=0.5), "--critic noise learns only from executed noises"),
        (dict(q_agg="min2", num_qs=1), "--q-agg min2 needs --num-qs >= 2"),
        (dict(actor_hidden=()), "--actor-hidden : one width ≥ 1 per hidden layer"),
        (dict(noise_scale=0.0), "--noise-scale and --init-temp must be > 0"),
        (dict(learning_starts=10, buffer_size=5), "--learning-starts 10 > --buffer-size 5"),
    ]
    for flags, says in cases:
        with pytest.raises(RunError) as e:
            ds.check(ds.Args(**{**flags, "run_dir": str(tmp_path / "never")}))
        assert says in str(e.value) and "\n" not in str(e.value), (flags, str(e.value))
        assert not os.path.exists(tmp_path / "never")
