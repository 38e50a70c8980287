"""acrlpd_pi0.py: in-process smoke, the TD target by hand, best-of-N = the critic's argmax, sharded = one device."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from conftest import host_file, xla_flags

import acrlpd_pi0 as ac
from common import data, envs, openpi, pi0, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(
    batch_size=8,
    online_batch_size=8,
    updates_per_call=4,
    utd=2,
    learning_starts=4,  # 2 envs: one chunk step without critic updates, then updates
    eval_episodes=3,
    num_envs=2,
    log_every=4,
    save_every=8,
    num_qs=3,
    critic_hidden=(16,),
    target_n=2,
    bon=3,
    target_flow_steps=2,
    flow_steps=2,
)


def test_smoke(tmp_path, tiny_runs):
    """Offline then online in-process (the same run killed and resumed from the command line: test_reliability.py)."""
    run_dir, out, compiled = tiny_runs("acrlpd_pi0")
    assert out["step"] == 16
    # jit once: the offline joint and online critic updates and π₀'s online update each compiled once, the save check
    # at most once (a module-level function: an earlier run in this process may have compiled it for these shapes)
    assert (compiled["jit(update)"], compiled["jit(act_learn)"]) == (2, 1) and compiled.get("jit(_finite)", 0) <= 1
    assert all(np.isfinite(out[k]) for k in ("losses/critic", "charts/q_target"))  # the online (critic-only) update
    assert np.isfinite(out["losses/distill"]) and np.isfinite(out["losses/bc"])  # π₀'s online update
    assert os.path.exists(os.path.join(run_dir, "critic_cache.p0.npz"))  # the prior data's target chunks
    for key in ("offline/eval/success_rate", "online/eval/plain_success_rate", "final/eval/q_gap"):
        assert key in out
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert any(np.isfinite(r.get("losses/bc", np.nan)) for r in rows)  # the offline joint update
    assert any("eval/q_realised" in r for r in rows) and os.path.isdir(os.path.join(run_dir, "checkpoints"))
    z = host_file(run_dir)  # acting's cache per transition: 1 warm-up + 4 steps of 2 envs
    assert z["buffer/extras/obs_z"].shape[0] == 2 * 5 and z["buffer/extras/next_cand"].shape[1:] == (2, 5, 2)
    assert not any(k.startswith(("buffer/obs/", "buffer/next_obs/")) for k in z)  # the critic reads only the cache
    assert z["loop/env/agent"].shape == (2, 2) and z["loop/obs/state"].shape == (2, 10)  # where the envs were
    # θ̄ averages the action expert and projections, not the VLM; the run's π₀ (export, --pi0-checkpoint) acts with it
    state = tiny.last_state(run_dir)
    assert "embedder" not in state["ema"]["PaliGemma"]["llm"] and "final_norm_1" in state["ema"]["PaliGemma"]["llm"]
    assert not np.allclose(state["ema"]["action_out_proj"]["kernel"], state["params"]["action_out_proj"]["kernel"])
    want = pi0.overlaid(state["params"], state["ema"])
    jax.tree.map(np.testing.assert_array_equal, openpi.load_pi0(run_dir, 5)[0], want)

    # online only: π₀ from that run folder and no prior data: no offline phase, π₀ evaluated at the start
    online_dir = str(tmp_path / "online")
    online = {k: v for k, v in tiny.ACRLPD.items() if k != "offline_steps"}  # no prior data: the default becomes 0
    out = ac.main(ac.Args(**online, pi0_checkpoint=run_dir, run_dir=online_dir))
    assert out["step"] == tiny.ACRLPD["online_steps"] and "start/eval/success_rate" in out
    assert json.load(open(os.path.join(online_dir, "args.json")))["offline_steps"] == 0
    rows = [json.loads(line) for line in open(os.path.join(online_dir, "metrics.jsonl"))]
    assert rows[0]["step"] == 0 and "eval/success_rate" in rows[0] and not any("losses/bc" in r for r in rows)
    z = host_file(online_dir)  # every critic batch came from here: 1 warm-up + 4 steps of 2 envs
    assert z["buffer/extras/obs_z"].shape[0] == 2 * 5 and "buffer/actions" not in z


def make_nets(**kw):
    args = ac.check(ac.Args(**{**TINY, **kw}))
    env = envs.make_env("push", 2)
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=args.action_horizon)
    model = pi0.Pi0(cfg)
    unit = lambda d: {
        "mean": np.zeros(d, np.float32),
        "std": np.ones(d, np.float32),
        "q01": -np.ones(d, np.float32),
        "q99": np.ones(d, np.float32),
    }
    table = pi0.make_prompt_table(env.prompts, pi0.BuiltinTokenizer(cfg.max_token_len, cfg.vocab_size))
    nets = ac.Nets(model, pi0.EnvIO(cfg, table, {"state": unit(10), "actions": unit(2)}, 2), ac.Critic((16,)))
    x = jnp.zeros((1, cfg.vlm.width + 10 + args.action_horizon * 2))
    critic = jax.vmap(lambda k: nets.critic.init(k, x)["params"])(jax.random.split(jax.random.key(1), args.num_qs))
    target = jax.vmap(lambda k: nets.critic.init(k, x)["params"])(jax.random.split(jax.random.key(2), args.num_qs))
    return nets, args, {"params": model.init(jax.random.key(0)), "critic": critic}, target, env


def test_td_target_by_hand():
    for agg in ("mean", "min2"):
        nets, args, params, target, env = make_nets(q_agg=agg, target_n=4)
        mu, sigma = 0.3, 2.0  # Q in critic units, (return − μ) / σ
        nets = dataclasses.replace(nets, ret=(mu, sigma))
        obs = env.reset(seed=0)[0]
        prefix = nets.pi.prefix(params["params"], nets.io.observe(obs))
        next_cand = nets.io.executed(nets.pi.sample_n(params["params"], prefix, jax.random.key(4), 4, 2))  # [B,4,H,A]
        batch = {
            "discounted_return": jnp.array([0.5, 0.0]),
            "n_valid": jnp.array([5, 2]),
            "mask": jnp.array([1.0, 0.0]),
            "next_obs_z": ac.critic_obs(prefix),
            "next_cand": next_cand,
        }
        rng = jax.random.key(3)
        y, _ = ac.td_target(params["critic"], target, batch, rng, nets, args)
        # by hand: each member on its own, the candidate ranked by the ONLINE critic's mean, valued by the TARGET
        z = np.concatenate([np.asarray(prefix.features), np.asarray(prefix.state)], -1)  # [B,W+S]
        flat = lambda c, z=z: np.concatenate([z, np.asarray(c).reshape(2, -1)], -1)
        member = lambda tree, e, c, nets=nets, flat=flat: nets.critic.apply(
            {"params": jax.tree.map(lambda p: p[e], tree)}, flat(c)
        )
        q_on = np.stack([[member(params["critic"], e, next_cand[:, i]) for i in range(4)] for e in range(3)])  # [E,N,B]
        a_next = np.asarray(next_cand)[np.arange(2), q_on.mean(0).argmax(0)]
        q_t = np.stack([member(target, e, a_next) for e in range(3)])  # [E,B]
        if agg == "mean":
            q_bar = q_t.mean(0)
        else:
            pair = np.asarray(jax.random.choice(rng, 3, (2,), replace=False))
            q_bar = q_t[pair].min(0)
        gamma = args.gamma  # the push preset's
        back = np.array([gamma**5, gamma**2]) * np.array([1.0, 0.0]) * (mu + sigma * q_bar)  # reward units
        want = (np.array([0.5, 0.0]) + back - mu) / sigma
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
        assert abs(want[1] + mu / sigma) < 1e-6  # a terminated chunk does not bootstrap: its return, 0, in critic units


def test_best_of_n_is_the_critic_argmax():
    nets, _, params, _, env = make_nets()
    p, c = params["params"], params["critic"]
    prefix = nets.pi.prefix(p, nets.io.observe(env.reset(seed=0)[0]))
    z = ac.critic_obs(prefix)
    for slice_ in (0, 2):
        chunk, q, _ = ac.best_of_n(nets, p, c, prefix, jax.random.key(5), 8, 2, 0.0, slice_)
        # score every candidate the same way, independently of the selection
        S = slice_ or 8
        keys = jax.random.split(jax.random.key(5), 8 // S)
        cand = jnp.concatenate([nets.pi.sample_n(p, prefix, k, S, 2) for k in keys], 1)  # [B,8,H,A]
        q_all = ac.q_values(nets, c, z, cand).mean(0)  # [B,8]
        idx = jnp.abs(cand - chunk[:, None]).sum((2, 3)).argmin(1)  # which candidate was returned
        rows = jnp.arange(2)  # the pick is the argmax up to float ties between near-equal untrained values
        np.testing.assert_allclose(np.asarray(chunk), np.asarray(cand[rows, idx]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(q_all[rows, idx]), np.asarray(q_all.max(1)), atol=1e-5)
        np.testing.assert_allclose(np.asarray(q), np.asarray(q_all.max(1)), atol=1e-5)
    # pessimism: mean − β·std, with β large enough the pick follows the least uncertain candidate
    chunk, _, _ = ac.best_of_n(nets, p, c, prefix, jax.random.key(5), 8, 2, 1e6)
    (key,) = jax.random.split(jax.random.key(5), 1)
    cand = nets.pi.sample_n(p, prefix, key, 8, 2)
    idx = jnp.abs(cand - chunk[:, None]).sum((2, 3)).argmin(1)
    q_e = ac.q_values(nets, c, z, cand)  # [E,B,8]
    np.testing.assert_allclose(np.asarray(q_e.std(0)[jnp.arange(2), idx]), np.asarray(q_e.std(0).min(1)), atol=1e-6)


def test_critic_batches_from_the_cache(tmp_path):
    """The online critic batches: offline rows from the once-encoded prior data (o_t's view, o_{t+H}'s view and
    π₀ chunks, those kept in the run folder), online rows from what acting stored in the buffer's extras (the buffer
    keeps no observations)."""
    nets, args, params, _, env = make_nets(target_n=2)
    episodes = data.load_episodes(envs.default_dataset(env="push", noise=0.6, episodes=12), prompts=env.prompts)
    offline = data.make_chunks(episodes, 5, 0.99)
    obs = env.reset(seed=0)[0]
    buffer = data.ReplayBuffer(16, 5, 0.99)
    run = runlog.Run(dataclasses.replace(args, run_dir=str(tmp_path / "run")), "acrlpd_pi0")
    sample = ac.online_batches(nets, args, params["params"], offline, buffer, run, jax.random.key(0), bs=64)
    n = len(offline)
    rows = sample(np.random.default_rng(0), n)  # an empty buffer: every row from the prior data
    i = np.random.default_rng(0).integers(0, n, n)  # the prior-data chunks it drew (drawn first, then buffer rows)
    assert rows["obs_z"].shape == (n, 64 + 10) and rows["next_cand"].shape == (n, 2, 5, 2)
    assert "obs" not in rows
    z = np.asarray(ac.encode(nets, args, params["params"], episodes.obs, jax.random.key(1))[0])  # every frame's view
    np.testing.assert_allclose(rows["obs_z"], z[offline.obs_idx[i]], atol=1e-5)
    np.testing.assert_allclose(rows["next_obs_z"], z[offline.next_obs_idx[i]], atol=1e-5)
    # the data chunks in the critic's (normalised) units: EnvIO.to_model of the dataset's actions
    a, o = episodes.actions[offline.action_idx[i[:3]]], episodes.obs["state"][offline.obs_idx[i[:3]]]
    np.testing.assert_allclose(rows["chunk"][:3], np.asarray(nets.io.executed(nets.io.to_model(a, o))), atol=1e-6)
    # π₀ moves online: a resumed run (another π₀) reads the target chunks the run started with, from its folder
    assert os.path.exists(os.path.join(run.dir, "critic_cache.p0.npz"))
    moved = jax.tree.map(lambda x: x + 0.1, params["params"])
    again = ac.online_batches(nets, args, moved, offline, buffer, run, jax.random.key(0), bs=64)
    np.testing.assert_array_equal(again(np.random.default_rng(0), n)["next_cand"], rows["next_cand"])
    # online rows: what acting stored in the buffer's extras, --online-fraction (0.5) of a batch, after the prior data's
    _, step = envs.execute_chunk(env, obs, np.zeros((2, 5, 2), np.float32), 0.99)
    extras = {"obs_z": np.full((2, 74), 7.0), "chunk": np.full((2, 5, 2), 7.0)}
    extras.update(next_obs_z=np.full((2, 74), 8.0), next_cand=np.full((2, 2, 5, 2), 8.0))
    buffer.add(step, extras)
    b = sample(np.random.default_rng(0), 10)
    assert (b["obs_z"][5:] == 7).all() and (b["next_cand"][5:] == 8).all() and (b["chunk"][5:] == 7).all()
    assert (b["n_valid"][5:] == 5).all()
    assert not (b["obs_z"][:5] == 7).any()
    only_online = ac.online_batches(nets, args, params["params"], None, buffer, run, jax.random.key(0))
    b = only_online(np.random.default_rng(0), 6)  # no prior data: every row from the buffer, each row one transition
    assert (b["obs_z"] == 7).all() and (b["next_obs_z"] == 8).all() and set(b) == set(extras) | set(ac.TD_KEYS)
    run.close()


def test_topk_draws_among_the_best():
    """--topk k: the executed chunk is one of the k best candidates; a cold draw is the best, a hot one varies."""
    nets, _, params, _, env = make_nets()
    p, c = params["params"], params["critic"]
    prefix = nets.pi.prefix(p, nets.io.observe(env.reset(seed=0)[0]))
    z = ac.critic_obs(prefix)
    pick = jax.jit(lambda key, temp: ac.best_of_n(nets, p, c, prefix, key, 8, 2, 0.0, 0, 3, temp)[0])
    ranks = []
    for i in range(12):
        key = jax.random.key(i)
        (k,) = jax.random.split(key, 1)
        cand = nets.pi.sample_n(p, prefix, k, 8, 2)  # the candidates best_of_n scores
        order = jnp.argsort(-ac.q_values(nets, c, z, cand).mean(0), axis=1)  # [B,8] best first
        for temp, out in ((1e-4, ranks), (1e4, ranks)):
            idx = jnp.abs(cand - pick(key, temp)[:, None]).sum((2, 3)).argmin(1)
            rank = np.asarray(jnp.argmax(order == idx[:, None], axis=1))  # 0: the best
            out.append((temp, rank))
    assert all((r == 0).all() for t, r in ranks if t < 1)  # cold: the argmax
    hot = np.concatenate([r for t, r in ranks if t > 1])
    assert hot.max() <= 2 and len(set(hot.tolist())) == 3  # hot: all of the top 3, nothing below


def test_action_horizon_beyond_the_model_chunk_is_refused():
    """A longer π₀ chunk than the executed one runs in tests/test_libero_scripts.py (openpi's pi0_libero shape)."""
    with pytest.raises(ValueError, match="--action-horizon between 1 and --model-horizon"):
        ac.main(ac.Args(offline_steps=1, online_steps=0, model_horizon=2, action_horizon=3, **TINY))


def test_bad_flags_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--learning-starts 500 > --buffer-size 100"):
        ac.check(ac.Args(**{**TINY, "learning_starts": 500, "buffer_size": 100}))
    with pytest.raises(ValueError, match="--bon-slice 2 must divide --bon 3"):
        ac.check(ac.Args(**{**TINY, "bon_slice": 2}))
    with pytest.raises(ValueError, match="--topk 4 > --bon 3: the draw is among the --bon candidates"):
        ac.check(ac.Args(**{**TINY, "topk": 4}))
    with pytest.raises(ValueError, match=r"--distill-weight must be ≥ 0 \(got -1.0\)"):
        ac.check(ac.Args(**{**TINY, "distill_weight": -1.0}))
    with pytest.raises(ValueError, match=r"--select-temp must be > 0 \(got 0.0\)"):
        ac.check(ac.Args(**{**TINY, "select_temp": 0.0}))
    assert ac.check(ac.Args()).learning_starts == 32_000  # the push config
    with pytest.raises(ValueError, match="--env Pendulum-v1: pass --dataset"):
        ac.check(ac.Args(env="Pendulum-v1"))
    (tmp_path / "d.h5").touch()
    gym = ac.check(runlog.configured(ac.CONFIGS, "Pendulum-v1", dataset=str(tmp_path / "d.h5")))
    assert (gym.env, gym.bon, gym.target_n) == ("Pendulum-v1", ac.CONFIGS["gym"].bon, 4)


@pytest.mark.slow  # ~40 s: a subprocess on 4 forced devices compiles both phases' sharded updates
def test_sharded_run_matches_one_device(tmp_path, small_push, tiny_runs):
    """4 forced CPU devices, --fsdp-devices 2 (batch split 2 × 2, large arrays sharded): the same losses as on one
    device, offline (the joint update) and online (critic updates on cached features), up to reduction order. The
    one-device run is test_smoke's."""
    cmd = [sys.executable, "acrlpd_pi0.py", "--fsdp-devices", "2", "--dataset", small_push]
    cmd += ["--run-dir", str(tmp_path / "d4"), *tiny.flags(tiny.ACRLPD)]
    env = {**os.environ, "WANDB_MODE": "offline", "XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")}
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for devices, run_dir in ((1, tiny_runs("acrlpd_pi0")[0]), (4, str(tmp_path / "d4"))):
        lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        rows[devices] = {r["step"]: r for r in lines if "losses/critic" in r}
    for step, key in ((4, "losses/bc"), (4, "losses/critic"), (12, "losses/critic"), (12, "charts/q_target")):
        got, want = rows[4][step][key], rows[1][step][key]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{key} at update {step}")
