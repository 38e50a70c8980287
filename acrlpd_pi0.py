"""Offline-to-online Q-chunking with prior data (RLPD on action chunks), π₀ as the policy.

Method: Li, Zhou and Levine, "Reinforcement Learning with Action Chunking" (2025) on top of RLPD (Ball et al., 2023).
  - π₀'s flow-matching loss on data chunks is the behaviour-cloning term (--bc-weight).
  - A critic ensemble (--num-qs LayerNorm MLPs) reads [stop_gradient(π₀ prefix features), state, H×A chunk] and
    learns the chunked n-step TD target   y = Σ_{k<H} γ^k r_{t+k} + γ^n · mask · Q̄(o_{t+H}, a′)   (n valid steps),
    a′ = the best of --target-n π₀ chunks at o_{t+H} ranked by the online critic (expected-max backup),
    Q̄ = the target ensemble's mean (or the min of a random pair, --q-agg min2); targets Polyak-averaged (τ).
  - Acting: --bon N chunks from one prefix pass, the one with the highest pessimistic value mean − β·std of the
    ensemble (--act-pessimism β) is executed open loop. --bon 1 is plain π₀.
  - Conservative term (--cql-weight, offline): the critic's mean value of π₀'s own chunks at o_t minus that of the
    data chunk, bounded below by the data's Monte Carlo return (Cal-QL).
  - Offline phase on the prior data: one jitted update trains π₀ (BC) and the critic (none without data: online only).
  - Online phase, π₀ frozen as the proposal distribution: each env chunk step stores the critic's view of o_t and
    o_{t+H} (pooled features and state) and --target-n π₀ chunks at o_{t+H}, all computed by acting anyway, and --utd
    critic updates run on those cached arrays (50/50 offline/online batches, one lax.scan): no VLM or flow pass per
    update, ~20× more critic updates per second, after --learning-starts online chunks (README: why this works).
Every evaluation logs the critic's calibration: its value of the chunks it chose (eval/*q_pred) against the
discounted return that actually followed (eval/*q_realised).

  python acrlpd_pi0.py                                   # push, CPU π₀ preset, offline then online, < 10 min
  python acrlpd_pi0.py --env libero --bon 32          # GPUs: openpi's pi0_libero and LIBERO data from their caches
  python acrlpd_pi0.py --offline-steps 20 --online-steps 8 --eval-episodes 4 --batch-size 8   # smoke
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from common import RunError, envs, mesh, pi0, qchunk, runlog

# Presets by --env (push, libero; any other gymnasium id: gym). A flag given explicitly (not None) wins.
_BASE = dict(num_qs=10, lr=2.5e-5, critic_lr=3e-4, bc_weight=1.0, gamma=0.99, num_envs=16, utd=4, learning_starts=5000,
             eval_episodes=100, buffer_size=200_000)  # fmt: skip
# push, measured: 2 members run ~3× the critic updates/s of 10 on 2 cores; --target-n 1 backs up π₀'s own chunk
_PUSH = dict(action_horizon=5, bon=8, target_n=1, num_qs=2, lr=1e-3, critic_lr=1e-3, gamma=0.95, utd=32, num_envs=64)
PRESETS = {
    "push": dict(_BASE, **_PUSH, learning_starts=32_000),
    "libero": dict(_BASE, action_horizon=10, bon=32, target_n=8, eval_episodes=50, eval_envs=16),  # 16 cores, 128 GB
    "gym": dict(_BASE, action_horizon=5, bon=8, target_n=4, lr=3e-4),
}


@dataclass
class Args(runlog.RunArgs):
    save_every: int = 2000
    """checkpoint every this many updates (and at the end)"""
    log_every: int = 200
    """log losses every this many updates"""
    eval_every: int = 0
    """evaluate every this many updates (0: only at the end of each phase)"""
    eval_episodes: int | None = None
    """episodes per evaluation (run in parallel, one per env; preset)"""
    num_envs: int | None = None
    """parallel environments in the online phase (preset)"""

    action_horizon: int | None = None
    """H, the chunk length executed open loop (preset)"""
    flow_steps: int = 5
    """Euler steps when acting"""
    image_size: int = 0
    """camera image size (push: 0 = state only; libero: 0 = the dataset's)"""
    freeze_backbone: bool = False
    """train only the action expert, the projections and the critic"""

    offline_steps: int = 6000
    """updates on the prior data before going online"""
    online_steps: int = 16000
    """critic updates in the online phase (each env chunk step is followed by --utd of them)"""
    batch_size: int = 64
    """chunk transitions per offline update"""
    updates_per_call: int = 20
    """offline updates per jitted call (lax.scan)"""
    lr: float | None = None
    """π₀ learning rate (preset)"""
    max_grad_norm: float = 1.0
    """global-norm clip of π₀'s gradient"""
    gamma: float | None = None
    """per-step discount (preset; push 0.95: an 80-step task whose failures are time-outs)"""
    bc_weight: float | None = None
    """weight of the flow-matching (BC) loss (preset)"""
    num_qs: int | None = None
    """critic ensemble size (preset)"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths"""
    critic_lr: float | None = None
    """critic learning rate (preset)"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    q_agg: Literal["mean", "min2"] = "mean"
    """target ensemble aggregation: mean (Q-chunking) or min2 (min of a random pair, RLPD)"""
    target_n: int | None = None
    """π₀ chunks sampled at o_{t+H} for the expected-max backup (preset)"""
    target_flow_steps: int = 5
    """Euler steps for those target chunks (as many as acting: backed-up chunks from the acting distribution)"""
    bon: int | None = None
    """chunks sampled when acting, best by the critic; 1 = plain π₀ (preset)"""
    bon_slice: int = 0
    """score the --bon candidates in slices of this many (lax.map) to bound memory; 0: all at once"""
    act_pessimism: float = 1.0
    """β: acting ranks candidates by ensemble mean − β·std"""
    cql_weight: float = 0.5
    """offline conservative penalty: mean Q of π₀ chunks at o_t minus Q of the data chunk (0: off)"""
    cql_bound: bool = True
    """Cal-QL (Nakamoto et al., 2023): the penalty pushes π₀'s chunks down only to the data's Monte Carlo return"""
    actor_weight: float = 0.0
    """weight of −Q(o, π₀(o)) back-propagated through the sampling steps (offline)"""
    utd: int | None = None
    """online critic updates per env chunk step, run in one jitted scan (preset)"""
    learning_starts: int | None = None
    """online chunks collected before the first online critic update (preset): fitted to a tiny buffer it over-fits"""
    online_batch_size: int = 256
    """transitions per online critic update (cached features: cheap)"""
    online_fraction: float = 0.5
    """share of online transitions in each online batch (RLPD: 0.5)"""
    buffer_size: int | None = None
    """replay buffer capacity (chunks; it keeps only the critic's cached arrays, ~20 kB a chunk for π₀; preset)"""


def check(args: Args) -> Args:
    """Fill the preset fields left at None (push, libero, else gym) and refuse inconsistent flags."""
    args = runlog.prepared(args, "acrlpd_pi0", PRESETS, data_with_checkpoint="optional")
    if args.pi0_checkpoint and args.dataset is None:  # no prior data: RL online from π₀, no offline phase
        args = dataclasses.replace(args, offline_steps=0)
    runlog.check_at_least(args, 1, "updates_per_call", "batch_size", "online_batch_size", "utd", "num_envs")
    runlog.check_at_least(args, 1, "bon", "target_n", "num_qs", "action_horizon", "flow_steps", "target_flow_steps")
    runlog.check_at_least(args, 0, "offline_steps", "online_steps", "learning_starts", "bon_slice")
    if args.q_agg == "min2" and args.num_qs < 2:
        raise RunError("--q-agg min2 needs --num-qs >= 2")
    if args.learning_starts > args.buffer_size:
        raise RunError(f"--learning-starts {args.learning_starts} > --buffer-size {args.buffer_size}: never updates")
    if args.bon_slice and args.bon % args.bon_slice:
        raise RunError(f"--bon-slice {args.bon_slice} must divide --bon {args.bon}")
    runlog.check_ranges(args, gamma=(0, 1), tau=(0, 1), lr=(0, None), critic_lr=(0, None), max_grad_norm=(0, None))
    if not 0 <= args.online_fraction <= 1:
        raise RunError(f"--online-fraction must be in [0, 1] (got {args.online_fraction})")
    return args


# ----------------------------------------------------------------------------------------------------- networks
class CriticMLP(nn.Module):
    """One Q(o, a_{t:t+H}) member: Dense → LayerNorm → GELU blocks, scalar out."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(h)(x)))
        return nn.Dense(1)(x)[..., 0]


@dataclass(frozen=True)
class Nets:
    """π₀, the env ↔ π₀ plumbing and the critic: what the losses and the acting functions close over."""

    pi: pi0.Pi0
    io: pi0.EnvIO
    critic: CriticMLP


def critic_obs(prefix: pi0.Prefix) -> jax.Array:
    """The critic's view of an observation, [B,W+S]: π₀'s mean-pooled prefix features and the normalised state.
    stop_gradient: the critic never trains the VLM."""
    return jnp.concatenate([jax.lax.stop_gradient(prefix.features), prefix.state], -1)


def q_values(nets: Nets, cparams, obs_z, chunks):
    """Ensemble values of executed chunks [B,N,H,A] (normalised) at critic views [B,W+S] -> [E,B,N]."""
    B, N = chunks.shape[:2]
    z = jnp.broadcast_to(obs_z[:, None], (B, N, obs_z.shape[-1]))
    x = jnp.concatenate([z, chunks.reshape(B, N, -1)], -1)
    return jax.vmap(nets.critic.apply, in_axes=(0, None))({"params": cparams}, x)  # members vmapped


def sample_chunks(nets: Nets, params, prefix, rng, n: int, steps: int):
    """n π₀ chunks per observation from one prefix -> executed part [B,n,H,A], whole chunk [B,n,H_m,A_m]."""
    c = nets.pi.config
    noise = jax.random.normal(rng, (prefix.mask.shape[0], n, c.action_horizon, c.action_dim))
    chunks = nets.pi.sample(params, prefix, noise, steps)
    return nets.io.executed(chunks), chunks


def best_of_n(nets: Nets, params, cparams, prefix, rng, n: int, steps: int, beta: float, slice_: int = 0):
    """Sample n chunks per observation from one prefix, pick argmax of mean − β·std -> chunk [B,H_m,A_m], q [B]."""
    S = slice_ or n
    obs_z = critic_obs(prefix)

    def part(key):
        ex, cand = sample_chunks(nets, params, prefix, key, S, steps)  # [B,S,H,A], [B,S,H_m,A_m]
        q = q_values(nets, cparams, obs_z, ex)  # [E,B,S]
        return cand, q.mean(0), q.std(0)

    cand, qm, qs = jax.lax.map(part, jax.random.split(rng, n // S))  # [n/S,B,S,...]
    cand, qm, qs = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n, *x.shape[3:]) for x in (cand, qm, qs))
    idx = jnp.argmax(qm - beta * qs, axis=1)  # [B]
    rows = jnp.arange(idx.shape[0])
    return cand[rows, idx], qm[rows, idx]


def encode(nets: Nets, args: Args, params, obs, rng):
    """What the critic needs of observations: views [B,W+S] and --target-n executed π₀ chunks [B,N,H,A]."""
    prefix = nets.pi.prefix(params, nets.io.observe(obs))
    cand, _ = sample_chunks(nets, params, prefix, rng, args.target_n, args.target_flow_steps)
    return jax.lax.stop_gradient((critic_obs(prefix), cand))


# ----------------------------------------------------------------------------------------------------- losses
TD_KEYS = ("discounted_return", "n_valid", "mask")  # what the TD target reads of a chunk transition


def td_target(cparams, target_cparams, batch, rng, nets: Nets, args: Args):
    """y = R + γ^{n_valid}·mask·Q̄(o_{t+H}, a′), a′ = the argmax over the --target-n π₀ chunks `next_cand`
    [B,N,H,A] of the online critic's mean (the expected-max backup). A constant for every loss (stop_gradient).
    -> y [B], info."""
    next_z, next_cand = batch["next_obs_z"], batch["next_cand"]
    best = jnp.argmax(q_values(nets, cparams, next_z, next_cand).mean(0), axis=1)  # [B]
    a_next = next_cand[jnp.arange(best.shape[0]), best]  # [B,H,A]
    q_next = q_values(nets, target_cparams, next_z, a_next[:, None])[:, :, 0]  # [E,B]
    if args.q_agg == "min2":
        pair = jax.random.choice(rng, q_next.shape[0], (2,), replace=False)
        q_bar = q_next[pair].min(0)
    else:
        q_bar = q_next.mean(0)
    discount = args.gamma ** batch["n_valid"].astype(jnp.float32)  # the bootstrap is n_valid steps away
    y = batch["discounted_return"] + discount * batch["mask"] * q_bar
    return jax.lax.stop_gradient(y), {"charts/q_target": y.mean()}


def critic_loss(cparams, batch, y, nets: Nets, args: Args):
    """TD regression of every member on y, plus the offline conservative term when `cand` (π₀'s chunks at o_t) is
    in the batch. -> (loss, info)."""
    q_data = q_values(nets, cparams, batch["obs_z"], batch["chunk"][:, None])[:, :, 0]  # [E,B]
    loss = jnp.mean(jnp.square(q_data - y[None]))
    info = {"losses/critic": loss, "charts/q_data": q_data.mean()}
    if "cand" in batch and args.cql_weight > 0:  # push π₀'s own chunks at o_t down relative to the data chunk
        q_pi = q_values(nets, cparams, batch["obs_z"], batch["cand"])  # [E,B,N]
        if args.cql_bound:  # Cal-QL: no lower than the data's Monte Carlo return
            q_pi = jnp.maximum(q_pi, batch["return_to_go"][None, :, None])
        gap = q_pi.mean(-1) - q_data  # [E,B]
        loss = loss + args.cql_weight * gap.mean()
        info["losses/cql_gap"] = gap.mean()
    return loss, info


def joint_loss(train, batch, rng, target_cparams, nets: Nets, args: Args):
    """Offline: BC (flow matching, weighted by valid) + the critic's TD (+ CQL, + actor term) -> (loss, info)."""
    k_flow, k_next, k_cand, k_target, k_actor = jax.random.split(rng, 5)
    prefix = nets.pi.prefix(train["params"], nets.io.observe(batch["obs"]))  # the one VLM pass for o_t
    if args.freeze_backbone:
        prefix = jax.lax.stop_gradient(prefix)
    actions = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m], relative where π₀ is
    w = batch["valid"].astype(jnp.float32)  # [B,H] padded steps past the episode's end are not imitated
    bc = nets.pi.flow_loss(train["params"], prefix, actions, k_flow)  # [B,H_m]
    bc_loss = (bc * nets.io.step_weights(w)).sum() / jnp.maximum(w.sum(), 1.0)
    frozen = jax.lax.stop_gradient(train)  # the critic's inputs and targets never train π₀
    next_z, next_cand = encode(nets, args, frozen["params"], batch["next_obs"], k_next)
    cand, _ = sample_chunks(nets, frozen["params"], jax.lax.stop_gradient(prefix), k_cand, args.target_n,
                            args.target_flow_steps)  # fmt: skip
    cb = {k: batch[k] for k in (*TD_KEYS, "return_to_go")}
    cb["obs_z"] = critic_obs(prefix)
    cb["chunk"] = nets.io.executed(actions)
    cb["cand"] = jax.lax.stop_gradient(cand)
    cb["next_obs_z"] = next_z
    cb["next_cand"] = next_cand
    y, info_t = td_target(frozen["critic"], target_cparams, cb, k_target, nets, args)
    c_loss, info = critic_loss(train["critic"], cb, y, nets, args)
    loss = args.bc_weight * bc_loss + c_loss
    info.update(info_t)
    info["losses/bc"] = bc_loss
    if args.actor_weight > 0:  # −Q(o, π₀(o)) through the Euler steps; the critic is a constant here
        act, _ = sample_chunks(nets, train["params"], prefix, k_actor, 1, args.flow_steps)
        actor = -q_values(nets, frozen["critic"], critic_obs(prefix), act).mean()
        loss = loss + args.actor_weight * actor
        info["losses/actor"] = actor
    return loss, info


# ----------------------------------------------------------------------------------------------------- update
def make_optimizers(args: Args, nets: Nets, params):
    """π₀: clipped Adam (under --freeze-backbone the VLM's parameters get zero updates); critic: Adam."""
    labels = nets.pi.optimizer_labels(params, "train", args.freeze_backbone)
    pi_tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.lr))
    tx = optax.multi_transform({"train": pi_tx, "frozen": optax.set_to_zero()}, labels)
    return tx, optax.adam(args.critic_lr)


def make_update(nets: Nets, args: Args, tx, critic_tx):
    """The offline joint update and the online critic update, each (state, batches [U,B,...], rng) -> (state, info)
    running U updates in one lax.scan."""

    def joint(state, batch, rng):
        train = {"params": state["params"], "critic": state["critic"]}
        grad_fn = jax.value_and_grad(joint_loss, has_aux=True)
        (_, info), g = grad_fn(train, batch, rng, state["target_critic"], nets, args)
        updates, opt = tx.update(g["params"], state["opt"], state["params"])
        c_updates, critic_opt = critic_tx.update(g["critic"], state["critic_opt"], state["critic"])
        critic = optax.apply_updates(state["critic"], c_updates)
        new = {
            "params": optax.apply_updates(state["params"], updates),
            "opt": opt,
            "critic": critic,
            "critic_opt": critic_opt,
            "target_critic": optax.incremental_update(critic, state["target_critic"], args.tau),
        }
        return new, info

    def critic_only(state, batch, rng):  # batch: cached critic views and chunks (`encode`), no π₀ pass
        y, info_t = td_target(state["critic"], state["target_critic"], batch, rng, nets, args)
        (_, info), g = jax.value_and_grad(critic_loss, has_aux=True)(state["critic"], batch, y, nets, args)
        c_updates, critic_opt = critic_tx.update(g, state["critic_opt"], state["critic"])
        critic = optax.apply_updates(state["critic"], c_updates)
        target = optax.incremental_update(critic, state["target_critic"], args.tau)
        return {**state, "critic": critic, "critic_opt": critic_opt, "target_critic": target}, {**info, **info_t}

    return mesh.scan_updates(joint), mesh.scan_updates(critic_only)


class CriticData:
    """Critic batches from cached arrays (the online phase): the offline chunks' critic views and π₀ chunks, encoded
    once with the frozen π₀, and the online transitions' ones, stored in the replay buffer's extras when acting;
    --online-fraction of each batch online (RLPD's symmetric sampling), all offline while the buffer is empty."""

    def __init__(self, nets: Nets, args: Args, params, offline: qchunk.ChunkDataset | None, buffer, rng, bs=1024):
        self.offline, self.buffer, self.online_fraction = offline, buffer, args.online_fraction
        if offline is None:  # no prior data: every batch from the buffer
            return
        data, enc = offline.data, jax.jit(partial(encode, nets, args))
        encode_rows = lambda i: enc(params, qchunk.gather_obs(data.obs, i), jax.random.fold_in(rng, i[0]))
        self.obs_z, self.cand = mesh.map_batches(encode_rows, len(data), bs)  # every frame once: [F,W+S], [F,N,H,A]
        to_model = jax.jit(lambda a, s: nets.io.executed(nets.io.to_model(a, s)))
        chunk_rows = lambda i: to_model(data.actions[offline.action_idx[i]], data.obs["state"][offline.obs_idx[i]])
        self.chunk = mesh.map_batches(chunk_rows, len(offline), bs)  # the data chunks as the critic reads them

    def sample(self, rng: np.random.Generator, n: int) -> dict:
        offline, b = self.offline, self.buffer
        online = {**{k: getattr(b, k) for k in TD_KEYS}, **b.extras}
        if offline is None:
            return {k: v[rng.integers(0, len(b), n)] for k, v in online.items()}
        n_on = int(round(n * self.online_fraction)) if len(b) else 0
        i = rng.integers(0, len(offline), n - n_on)
        j = rng.integers(0, len(b) or 1, n_on)
        o, nxt = offline.obs_idx[i], offline.next_obs_idx[i]
        out = {k: getattr(offline, k)[i] for k in TD_KEYS}
        out.update(obs_z=self.obs_z[o], chunk=self.chunk[i], next_obs_z=self.obs_z[nxt], next_cand=self.cand[nxt])
        if n_on:  # offline rows, then online rows
            out = {k: np.concatenate([v, online[k][j]]) for k, v in out.items()}
        return out


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(nets: Nets, args: Args):
    @partial(jax.jit, static_argnames="n")
    def act(state, obs, rng, n: int, beta: float):
        """Best of n chunks by mean − β·std (n = 1: plain π₀) -> env-unit chunk [B,H,A], critic mean there [B],
        and what the replay buffer caches: the critic's view [B,W+S] and the executed chunk [B,H,A] (normalised)."""
        prefix = nets.pi.prefix(state["params"], nets.io.observe(obs))
        slice_ = args.bon_slice if n == args.bon else 0
        chunk, q = best_of_n(nets, state["params"], state["critic"], prefix, rng, n, args.flow_steps, beta, slice_)
        return nets.io.to_env(chunk, obs["state"]), q, critic_obs(prefix), nets.io.executed(chunk)

    return act


def evaluate(act, state, args: Args, spec: envs.EnvSpec, rng, label: str) -> dict:
    """One episode in each of --eval-episodes envs per policy: success, return and the critic's calibration (its value
    of the chunks it chose, eval/*q_pred, vs the discounted return that followed, eval/*q_realised); printed."""
    where = dict(episodes=args.eval_episodes, num_envs=args.eval_envs or args.eval_episodes, seed=args.seed + 10_000)
    where.update(horizon=args.action_horizon, gamma=args.gamma)
    policies = {"": (args.bon, args.act_pessimism), "plain_": (1, 0.0)}  # best-of-N (trained), plain π₀
    if args.act_pessimism:  # and what the pessimism adds: ranking by the ensemble mean alone
        policies["bon_mean_"] = (args.bon, 0.0)
    out, shown = {}, []
    for prefix, (n, beta) in policies.items():  # best of n chunks by mean − β·std
        policy = lambda obs, key, n=n, beta=beta: act(state, obs, key, n, beta)[:2]
        out.update(envs.evaluate(spec, policy, rng, prefix=prefix, **where))
        q = f"Q pred {out[f'eval/{prefix}q_pred']:.3f} vs realised {out[f'eval/{prefix}q_realised']:.3f}"
        name = {"": f"BoN-{args.bon}", "plain_": "plain π₀"}.get(prefix, "BoN by mean only")
        shown.append(f"{name} {out[f'eval/{prefix}success_rate']:.1%} ({q})")
    print(f"[{label}] " + " | ".join(shown), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    # ---- setup: flags, devices, env, data, π₀, networks, optimisers, state
    args = check(args)
    dev_mesh = mesh.make_mesh(args.fsdp_devices)
    mesh.check_split(dev_mesh, {"--batch-size": args.batch_size, "--online-batch-size": args.online_batch_size})
    k_init, k_run, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    k_pi, k_critic, k_cache = jax.random.split(k_init, 3)
    spec = envs.make_spec(args.env, args.env_kwargs, args.dataset, args.image_size)
    env = spec.make_share(args.num_envs, args.seed)  # this process's envs
    path = args.dataset or (None if args.pi0_checkpoint else envs.default_dataset("push", image_size=args.image_size))
    data = envs.load_dataset(path, env, spec.image_size) if path else None  # None: online only, from π₀
    offline = qchunk.make_chunks(data, args.action_horizon, args.gamma) if data else None
    stats, prompts = (qchunk.norm_stats(data), data.prompts) if data else (None, env.prompts)
    policy = runlog.make_policy(env, prompts, stats, k_pi, action_horizon=args.action_horizon, **args.pi0_flags())
    cfg = policy.model.config
    nets = Nets(policy.model, policy.io, CriticMLP(tuple(args.critic_hidden)))
    x = jnp.zeros((1, cfg.vlm.width + (cfg.state_dim or cfg.action_dim) + args.action_horizon * env.action_dim))
    critic = jax.jit(jax.vmap(lambda k: nets.critic.init(k, x)["params"]))(jax.random.split(k_critic, args.num_qs))
    tx, critic_tx = make_optimizers(args, nets, policy.params)
    state = {"params": policy.params, "opt": tx.init(policy.params), "critic": critic}
    state.update(critic_opt=critic_tx.init(critic), target_critic=jax.tree.map(jnp.copy, critic))
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))
    n_pi, n_critic = pi0.param_count(state["params"]) / 1e6, pi0.param_count(state["critic"]) / args.num_qs / 1e3
    print(f"π₀ {n_pi:.2f}M params, critic {args.num_qs}×{n_critic:.0f}k, {len(offline or ())} chunks from {path}")
    run = runlog.Run.from_args(args, "acrlpd_pi0")
    buffer = qchunk.ReplayBuffer(args.buffer_size, args.action_horizon, args.gamma, td_only=True)  # + critic's cache

    # ---- restore: the train state, and on the host the buffer, the envs and the online episodes' successes
    step, obs, ep_success = 0, env.reset(seed=args.seed)[0], []  # ep_success: the online episodes' last 100
    if (restored := run.restore(state)) is not None:
        step, state, _, host = restored
        buffer.load_state_dict(host["buffer"])
        obs, ep_success = envs.resume_loop(env, host["loop"], args.seed + step), list(host["ep_success"])

    def save(step):  # a repeated step (warm-up: no updates) rewrites the host part only
        host = {"buffer": buffer.state_dict(), "loop": envs.loop_state(env, obs), "ep_success": ep_success}
        run.save(step, state, {"step": step, **policy.record()}, host)

    # ---- loop: offline (π₀ and critic on the prior data), then online (π₀ frozen, critic on cached features)
    joint_update, critic_update = make_update(nets, args, tx, critic_tx)
    act = mesh.host_local(make_act(nets, args), dev_mesh)  # each process acts on its own envs
    encode_next = mesh.host_local(jax.jit(partial(encode, nets, args)), dev_mesh)
    keys = ("obs", "next_obs", "actions", "valid", "return_to_go", *TD_KEYS)
    total = args.offline_steps + args.online_steps
    results, info = {}, {}
    for phase, end in (("offline", args.offline_steps), ("online", total)):
        t_phase, s_phase, warm = time.time(), step, 10 * len(buffer) // max(args.learning_starts, 1)
        if phase == "online" and step < end:  # π₀ is frozen from here: encode the prior data once
            cache = CriticData(nets, args, state["params"], offline, buffer, k_cache)
            print(f"critic cache of {len(offline or ())} offline chunks ready in {time.time() - t_phase:.0f}s")
        while step < end:
            key = jax.random.fold_in(jax.random.fold_in(k_run, step), len(buffer))  # warm-up steps add no updates
            k_act, k_update, k_next = jax.random.split(key, 3)
            np_rng = np.random.default_rng([args.seed, step])  # the data order, a function of the step (resume)
            if phase == "offline":
                n = min(args.updates_per_call, end - step)
                bs = [offline.sample(np_rng, args.batch_size, keys) for _ in range(n)]
                state, info = joint_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
            else:  # one chunk in every env, cache what the critic reads, then --utd critic updates
                chunk, _, obs_z, executed = act(state, obs, k_act, args.bon, args.act_pessimism)
                next_obs, cs = envs.execute_chunk(env, obs, np.asarray(chunk), args.gamma)
                next_z, next_cand = encode_next(state["params"], cs.final_obs, k_next)  # o_{t+H}, before any reset
                extras = {"obs_z": obs_z, "chunk": executed, "next_obs_z": next_z, "next_cand": next_cand}
                chunk, cs, extras = mesh.all_rows(jax.device_get((chunk, cs, extras)))  # all envs: one buffer for all
                buffer.add(obs, chunk, cs, extras=extras)
                ep_success = (ep_success + cs.success[cs.terminated | cs.truncated].tolist())[-100:]
                obs = next_obs
                n = min(args.utd, end - step) if len(buffer) >= args.learning_starts else 0
                if n:
                    bs = [cache.sample(np_rng, args.online_batch_size) for _ in range(n)]
                    state, info = critic_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
                elif (tenth := 10 * len(buffer) // args.learning_starts) > warm:  # warm-up: progress, buffer kept
                    kb = buffer.bytes_per_transition() / 1e3
                    print(f"[online] {len(buffer)}/{args.learning_starts} chunks ({kb:.1f} kB each) before updates")
                    save(step)
                    warm = tenth
            prev, step = step, step + n
            # ---- log
            if runlog.crossed(prev, step, args.log_every) or (n and step == end):
                m = {**info, "charts/online_success_rate": np.mean(ep_success)} if ep_success else info
                run.report(step, m, phase, total, (s_phase, t_phase), ("losses/bc", "losses/critic", "charts/q_data"))
            # ---- evaluate
            if runlog.crossed(prev, step, args.eval_every) and step != end:
                run.log(step, evaluate(act, state, args, spec, jax.random.fold_in(k_eval, step), f"eval {step}"))
            # ---- save (SIGINT / SIGTERM: save here and exit)
            if (runlog.crossed(prev, step, args.save_every) or run.stopping) and step != end:
                save(step)
        if step > s_phase or (step == end == 0 and run.saved_step is None):  # the phase ran (or none: π₀'s start)
            rate = (step - s_phase) / max(time.time() - t_phase, 1e-9)
            label = f"{phase} done, update {step}, {rate:.1f} updates/s"
            m = evaluate(act, state, args, spec, jax.random.fold_in(k_eval, step), label)
            m[f"time/{phase}_updates_per_s"] = rate
            run.log(step, m)
            results.update({f"{phase}/{k}": v for k, v in m.items()})
            results.update({f"final/{k}": v for k, v in m.items()})
            save(step)
    env.close()
    run.close()
    results.update({k: float(v) for k, v in jax.device_get(info).items()}, step=step, run_dir=run.dir)
    return results


if __name__ == "__main__":
    with runlog.one_line_errors():
        main(tyro.cli(Args))
