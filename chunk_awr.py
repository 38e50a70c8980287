"""Offline chunk-level advantage-weighted regression (AWR) on π₀: each action chunk is one decision.

Method (Peng et al., "Advantage-Weighted Regression", 2019; IQL's expectile value, Kostrikov et al., 2021; on
H-step action chunks as in Li, Zhou and Levine, "Reinforcement Learning with Action Chunking", 2025):
  critic   L_Q = E[(Q_θi(x_t, A_t) − y_t)²] for twin critics i = 1, 2, with y_t (--critic-target)
             mc (default): G_t = Σ_{k≥0} γ^k r_{t+k}, the data's return to the episode's end (one-step AWR); past a
             time limit its last reward repeated, or with --truncation bootstrap γ^{L−t} V_ψ(x_{L−1}) (sg)
             td: r_t + γ^n (1 − done) V_ψ(x_{t+H}) (n valid steps, sg); r_t = Σ_{k<H} γ^k r_{t+k} (--reward
             return) or the chunk's max sub-goal flag (--reward subgoal, as in chunk-level offline RL for LIBERO)
  value    L_V = E[(V_ψ(x_t) − E_{A∼π}[Q̄(x_t, A) − α log π(A|x_t)])²] with M chunks from one prefix pass
             (--value-loss sampled; log π by the flow's change of variables), or IQL's expectile of Q̄(x_t, A_t)
             (--value-loss expectile, the default: ~2.5× cheaper and it never queries π₀ off the data)
  policy   L_π = Σ w_t Σ_h valid·ℓ_flow / Σ w_t Σ_h valid,  w_t = min(exp(β (Q̄ − V) / s), --max-weight)  (sg on w)
  Q̄ is the min of the two Polyak-averaged target critics. Scale-free: Q and V learn in critic units, (return − μ)/σ
  with the data's return mean and std, and s is the advantages' std over the dataset (two-phase; joint: the batch),
  so β is in units of the advantages' spread: rewards a·r (a > 0) give the same run, a shift b the same run up to
  the b·Σγ^k its episodes' lengths add. Q and V read [sg(π₀ prefix features), state], Q also the chunk in π₀'s
  action space (relative to the state where π₀'s is); the policy is π₀, evaluated and exported as the average θ̄ of
  its weights over the updates (θ̄ ← d·θ̄ + (1 − d)·θ, --ema-decay d; openpi's EMA), trained as θ.
Schedules: --schedule two-phase (default) trains Q and V first on the frozen initial π₀'s features, computes the
advantage of every dataset chunk once, then trains π₀ by weighted flow matching at BC speed (by default the
weights pick the chunks, P(i) ∝ w_i, and the loss gets w ≡ 1: the same objective with a full effective batch;
--weighting loss weights the loss instead); --schedule joint minimises L = L_Q + λ_V L_V + λ_π L_π every step.
The two-phase form is the default: it is faster per update and learned more on push (docs/results/push.md). --beta
0 gives w ≡ 1 exactly: plain behaviour cloning through
the same update (the benchmark's baseline; the critic phase is then skipped, since nothing reads it).

  python chunk_awr.py                                    # push, mixed-quality demos, CPU π₀ preset, < 10 min
  python chunk_awr.py --env libero                       # GPUs: openpi's pi0_libero and LIBERO data from their caches
  python chunk_awr.py --critic-steps 20 --policy-steps 10 --episodes 30 --eval-episodes 4 --batch-size 8   # smoke
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import RunError, data, envs, mesh, pi0, runlog


@dataclass
class Args(runlog.RunArgs):
    # ---- env and cadence (steps: updates, critic then policy)
    action_horizon: int = 5
    """H, the chunk length executed open loop"""
    eval_episodes: int = 100
    """episodes per evaluation (the same ones every time)"""
    eval_envs: int = 100
    """environments an evaluation plays its episodes on (at most --eval-episodes are used)"""
    log_every: int = 200
    """log metrics every this many updates (0: only at the end of each phase)"""
    eval_every: int = 2000
    """evaluate every this many policy updates, and at the start and end of π₀'s training (0: only then)"""
    save_every: int = 2000
    """checkpoint every this many updates, and at the end of each phase and on SIGINT/SIGTERM (0: only then)"""

    # ---- model
    flow_steps: int = 4
    """Euler steps when acting"""
    eval_noise: float = 0.0
    """scale of the initial flow noise at evaluation (0: the deterministic policy)"""
    eval_raw: bool = False
    """with --ema-decay: evaluate the last update's weights too (eval/raw_*: the run that --ema-decay 0 would make)"""
    episodes: int = 1500
    """default push dataset size (split evenly over noise 0.3/0.6/1.0)"""

    # ---- algorithm
    schedule: Literal["two-phase", "joint"] = "two-phase"
    """two-phase (Q,V first, then weighted flow matching) or joint (L = L_Q + λ_V L_V + λ_π L_π every step)"""
    critic_steps: int = 3000
    """two-phase: Q/V updates before the policy phase (MLP speed, on precomputed features)"""
    policy_steps: int = 14_000
    """π₀ updates (two-phase: the weighted flow-matching phase; joint: all updates)"""
    time_budget_s: float = 0.0
    """stop training after this many seconds of training (evaluation excluded; 0: no limit)"""
    batch_size: int = 64
    """chunks per π₀ update"""
    critic_batch_size: int = 256
    """chunks per Q/V update in the two-phase critic phase"""
    updates_per_call: int = 10
    """updates per jitted call (lax.scan); the critic phase runs 5× as many"""
    lr: float = 3e-4
    """π₀ learning rate"""
    weight_decay: float = 1e-4
    """π₀'s AdamW weight decay"""
    ema_decay: float = 0.999
    """d of π₀'s weights averaged over its updates, θ̄ ← d·θ̄ + (1 − d)·θ (openpi's EMA): evaluations, the sampled
    value target and the exported π₀ are θ̄; gradients and AdamW act on θ (0: off, the last update's weights)"""
    gamma: float = 0.99
    """per-step discount"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """Q and V MLP widths"""
    critic_lr: float = 3e-4
    """Q and V learning rate"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    critic_target: Literal["mc", "td"] = "mc"
    """y of L_Q: mc (the discounted return to the episode's end: Q of the data's policy by regression, no bootstrap
    lag, as one-step AWR) or td (r_t + γ^n (1 − done) V(x_{t+H}): slower to propagate, it needs more critic steps)"""
    truncation: Literal["repeat", "bootstrap"] = "repeat"
    """mc's tail past a time limit: repeat (the last reward forever: γ^(L−t) r_{L−1} / (1 − γ), data's return_to_go)
    or bootstrap (γ^(L−t) V(x_{L−1}), the last stored frame standing in for the unseen next one; V is IQL's upper
    expectile, an optimistic tail; measured: docs/results/ogbench.md)"""
    reward: Literal["return", "subgoal"] = "return"
    """td's chunk reward: return (in-chunk discounted return) or subgoal (max of the per-step sub-goal flags)"""
    value_loss: Literal["expectile", "sampled"] = "expectile"
    """expectile (IQL on data chunks) or sampled (E over M π₀ chunks of Q̄ − α log π)"""
    expectile: float = 0.7
    """τ of the expectile value loss"""
    num_samples: int = 8
    """M: π₀ chunks per observation for the sampled value loss"""
    value_flow_steps: int = 4
    """Euler steps for those chunks"""
    alpha: float = 0.0
    """entropy weight α of the sampled value target, in critic units (needs log π: divergence along the flow)"""
    hutchinson_above: int = 32
    """log π: exact Jacobian trace when H·A ≤ this, else Hutchinson's estimator"""
    beta: float = 3.4
    """inverse temperature β of w = exp(β A / std(A)), in units of the advantages' spread; 0 = plain BC"""
    max_weight: float = 100.0
    """clip of the weights"""
    weighting: Literal["sample", "loss"] = "sample"
    """two-phase: sample chunks with probability ∝ w and give the loss w ≡ 1 (the same objective in expectation,
    with a full effective batch where loss weights would leave a fraction of it), or weight the loss"""
    weight_norm: Literal["batch", "none"] = "batch"
    """batch: divide the weighted loss by Σ w·valid (self-normalised); none: by Σ valid"""
    lambda_v: float = 1.0
    """λ_V (joint schedule)"""
    lambda_pi: float = 1.0
    """λ_π (joint schedule)"""


# The flags that depend on the env, per env (--env picks one; "gym": any other gymnasium id; push's are the defaults).
CONFIGS = {
    "push": Args(env="push", action_horizon=5, eval_episodes=100, eval_envs=100, pi0_preset="cpu"),
    "libero": Args(env="libero", action_horizon=10, eval_episodes=50, eval_envs=16, pi0_preset="pi0"),
    "gym": Args(env="gym", action_horizon=5, eval_episodes=100, eval_envs=16, pi0_preset="cpu"),
}


def check(args: Args) -> Args:
    """The run's flags (a resumed run's own), LIBERO's inputs found in the caches; inconsistent flags refused."""
    args = runlog.prepared(args, "chunk_awr", CONFIGS, data_with_checkpoint="needed")
    runlog.check_at_least(args, 1, "updates_per_call", "batch_size", "critic_batch_size", "eval_envs", "flow_steps")
    runlog.check_at_least(args, 1, "action_horizon", "eval_episodes", "num_samples", "value_flow_steps")
    runlog.check_at_least(args, 0, "critic_steps", "policy_steps", "log_every", "eval_every", "save_every")
    runlog.check_ranges(args, gamma=(0, 1), tau=(0, 1), expectile=(0, 1), lr=(0, None), critic_lr=(0, None))
    if not args.critic_hidden or min(args.critic_hidden) < 1:
        raise RunError(f"--critic-hidden {' '.join(map(str, args.critic_hidden))}: one width ≥ 1 per hidden layer")
    runlog.check_ema(args.ema_decay, args.policy_steps, "policy updates")
    if args.beta < 0 or args.max_weight <= 0:
        raise RunError("--beta must be ≥ 0 and --max-weight > 0")
    if args.alpha < 0 or (args.alpha > 0 and args.value_loss != "sampled"):
        raise RunError("--alpha > 0 needs --value-loss sampled (log π of π₀'s own chunks)")
    if args.reward == "subgoal" and args.critic_target != "td":
        raise RunError("--reward subgoal is the TD target's chunk reward: add --critic-target td")
    if args.truncation == "bootstrap" and args.critic_target != "mc":
        raise RunError("--truncation bootstrap is the Monte Carlo target's tail: drop it or use --critic-target mc")
    return args


# ----------------------------------------------------------------------------------------------------- networks
class MLP(nn.Module):
    """One Q member, or V: Dense → LayerNorm → GELU blocks, a scalar out."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # [..., D] -> [...]
        for width in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(width)(x)))
        return nn.Dense(1)(x)[..., 0]


@dataclass(frozen=True)
class Nets:
    """π₀, the env ↔ π₀ plumbing and the critics (Q twins, V): what the losses and the acting functions close over."""

    pi: pi0.Pi0
    io: pi0.EnvIO
    q: MLP  # one Q member, [sg(features), state, chunk] -> Q
    v: MLP  # V, [sg(features), state] -> V
    ret_mu: float = 0.0  # Q and V are in critic units, (return − ret_mu) / ret_sigma: the data's returns' mean and std
    ret_sigma: float = 1.0


def critic_obs(features, state) -> jax.Array:
    """The critics' view of an observation, [B,W+S]: π₀'s mean-pooled prefix features and the normalised state.
    stop_gradient: the critics never train the VLM."""
    return jax.lax.stop_gradient(jnp.concatenate([features, state], -1))


def q_values(nets: Nets, qparams, obs_z, chunks):
    """Twin critics' values of chunks [B,...,H,A] (normalised, π₀'s form) at views [B,W+S] -> [2,B,...]."""
    lead = chunks.shape[:-2]
    z = jnp.broadcast_to(jnp.expand_dims(obs_z, tuple(range(1, len(lead)))), lead + obs_z.shape[-1:])
    x = jnp.concatenate([z, chunks.reshape(*lead, -1)], -1)
    return jax.vmap(nets.q.apply, in_axes=(0, None))({"params": qparams}, x)  # members vmapped


def value(nets: Nets, vparams, obs_z):  # -> [B]
    return nets.v.apply({"params": vparams}, obs_z)


def return_units(chunks: data.ChunkDataset | None) -> tuple[float, float]:
    """(μ, σ), the mean and std of the data's Monte Carlo returns from o_t: Q and V learn in critic units
    (return − μ) / σ, so that their learning rates and β hold at any reward scale. (0, 1) without chunks."""
    if chunks is None or len(chunks) == 0:
        return 0.0, 1.0
    mu = float(chunks.return_to_go.mean())
    sigma = float(chunks.return_to_go.std())
    return mu, sigma if sigma > 0 else 1.0


# ----------------------------------------------------------------------------------------------------- losses
def chunk_reward(batch, kind: str):
    """r_t per chunk [B]: the in-chunk discounted return, or 1 if a valid step of the chunk completes a sub-goal."""
    if kind == "subgoal":
        return batch["subgoal"].astype(jnp.float32)  # data.make_chunks: (per-step flag & valid).any over the chunk
    return batch["discounted_return"].astype(jnp.float32)


def awr_weights(adv, beta: float, max_weight: float):
    """w = min(exp(β A), max_weight), stop-gradient. β = 0 gives exactly 1."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(beta * adv), max_weight))


def value_target(params, critic, prefix, rng, nets: Nets, args: Args):
    """E over M π₀ chunks of min Q̄ − α log π, from the given prefix (all stop-gradient) -> [B]."""
    c = nets.pi.config
    k_noise, k_trace = jax.random.split(rng)
    params, prefix = jax.lax.stop_gradient((params, prefix))
    noise = jax.random.normal(k_noise, (prefix.features.shape[0], args.num_samples, c.action_horizon, c.action_dim))
    if args.alpha > 0:
        hutchinson = c.action_horizon * c.action_dim > args.hutchinson_above
        chunks, logp = nets.pi.sample_logp(params, prefix, noise, args.value_flow_steps, k_trace, hutchinson)
    else:
        chunks, logp = nets.pi.sample(params, prefix, noise, args.value_flow_steps), 0.0
    obs_z = critic_obs(prefix.features, prefix.state)
    q = q_values(nets, critic["target_q"], obs_z, nets.io.executed(chunks)).min(0)  # [B,M]
    return jax.lax.stop_gradient(jnp.mean(q - args.alpha * logp, axis=1))


def critic_loss(critic, batch, v_target, nets: Nets, args: Args):
    """L_Q + λ_V L_V on views batch["obs_z"] and chunks batch["chunk"]. v_target: [B] E_π[Q̄ − α log π] (sampled) or
    None (expectile on the data chunk). -> (loss, info)."""
    obs_z, chunks = batch["obs_z"], batch["chunk"]
    mu, sigma = nets.ret_mu, nets.ret_sigma  # critic units: (return − μ) / σ, whatever the reward's scale
    if args.critic_target == "mc" and "end_obs_z" in batch:  # G_t to the episode's end, then V past a time limit
        tail = batch["end_discount"] * (mu + sigma * value(nets, critic["v"], batch["end_obs_z"]))  # reward units
        y = (batch["return_to_end"] + tail - mu) / sigma
    elif args.critic_target == "mc":  # --truncation repeat: data.make_chunks' tail, the last reward forever
        y = (batch["return_to_go"] - mu) / sigma
    else:  # the bootstrap back in reward units, the target in critic units
        v_next = mu + sigma * value(nets, critic["v"], batch["next_obs_z"])
        discount = args.gamma ** batch["n_valid"].astype(jnp.float32)  # the bootstrap is n_valid steps away
        y = (chunk_reward(batch, args.reward) + discount * batch["mask"] * v_next - mu) / sigma
    y = jax.lax.stop_gradient(y)
    q = q_values(nets, critic["q"], obs_z, chunks)  # [2,B]
    loss_q = jnp.mean(jnp.square(q - y[None]))
    v = value(nets, critic["v"], obs_z)
    if v_target is None:  # IQL expectile of the target twins' min on the data chunk
        diff = jax.lax.stop_gradient(q_values(nets, critic["target_q"], obs_z, chunks).min(0)) - v
        loss_v = jnp.mean(jnp.abs(args.expectile - (diff < 0).astype(jnp.float32)) * jnp.square(diff))
    else:
        loss_v = jnp.mean(jnp.square(v - jax.lax.stop_gradient(v_target)))
    info = {"losses/q": loss_q, "losses/v": loss_v, "charts/q": q.mean(), "charts/v": v.mean(), "charts/y": y.mean()}
    return loss_q + args.lambda_v * loss_v, info


def policy_loss(params, prefix, batch, adv, rng, nets: Nets, args: Args):
    """Advantage-weighted flow matching: Σ_b w_b Σ_h valid·ℓ_bh / normaliser. w ≡ 1 is the BC flow loss."""
    w = awr_weights(adv, args.beta, args.max_weight)  # [B]
    target = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m]; delta dims: − state
    valid = nets.io.step_weights(batch["valid"].astype(jnp.float32))  # [B,H_m], 0 on steps never executed
    per_step = nets.pi.flow_loss(params, prefix, target, rng)  # [B,H_m]
    m = valid * w[:, None]
    denom = m.sum() if args.weight_norm == "batch" else valid.sum()
    loss = (per_step * m).sum() / jnp.maximum(denom, 1e-6)
    info = {"losses/policy": loss, "charts/adv_std": adv.std(), "charts/weight_mean": w.mean()}
    info["charts/weight_max"] = w.max()
    return loss, info


def total_loss(train, batch, rng, policy, phase: str, nets: Nets, args: Args):
    """critic (two-phase 1, on precomputed views), policy (two-phase 2, advantages from the table) or joint (all of
    L_Q + λ_V L_V + λ_π L_π on one VLM pass, advantages from the current critics); `policy`: the weights that act
    (`acting_params`), whose chunks the sampled value target averages over. -> (loss, info)."""
    k_pi, k_v = jax.random.split(rng)
    params, critic = train["params"], train["critic"]
    batch = dict(batch)
    prefix = None
    if "obs_z" not in batch:  # the one VLM pass for o_t
        prefix = nets.pi.prefix(params, nets.io.observe(batch["obs"]))
        batch["obs_z"] = critic_obs(prefix.features, prefix.state)
    loss, info = 0.0, {}
    if phase in ("critic", "joint"):
        batch["chunk"] = nets.io.executed(nets.io.to_model(batch["actions"], batch["obs"]["state"]))  # [B,H,A]
        for k in ("next_obs", "end_obs"):  # o_{t+H} (td), o_{L−1} (mc's bootstrap): one more VLM pass each, sg
            if k in batch and f"{k}_z" not in batch:
                nxt = nets.pi.prefix(params, nets.io.observe(batch[k]))
                batch[f"{k}_z"] = critic_obs(nxt.features, nxt.state)
        v_target = value_target(policy, critic, prefix, k_v, nets, args) if args.value_loss == "sampled" else None
        loss, info = critic_loss(critic, batch, v_target, nets, args)
    if phase in ("policy", "joint"):
        if phase == "joint":  # A = min Q̄ − V on this batch, from the current critics
            q = q_values(nets, critic["target_q"], batch["obs_z"], batch["chunk"]).min(0)
            adv = q - value(nets, critic["v"], batch["obs_z"])
            adv = adv / (jax.lax.stop_gradient(adv.std()) + 1e-6)  # β in units of the batch's spread
        else:  # from the table computed after the critic phase
            adv = batch["adv"]
        l_pi, info_pi = policy_loss(params, prefix, batch, adv, k_pi, nets, args)
        loss = loss + args.lambda_pi * l_pi if phase == "joint" else l_pi
        info.update(info_pi)
    return loss, info


# ----------------------------------------------------------------------------------------------------- update
def acting_params(state):
    """π₀'s weights that act (evaluations, sampled targets, export): the average θ̄ when kept, else the last θ."""
    return pi0.overlaid(state["params"], state["ema"]) if state["ema"] else state["params"]


def make_optimizers(args: Args):
    """π₀: clipped AdamW; critics: Adam."""
    adamw = optax.adamw(args.lr, weight_decay=args.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), adamw)
    return tx, optax.adam(args.critic_lr)


def make_update(nets: Nets, args: Args, tx, critic_tx, shardings):
    """One update per phase, (state, batches [K,B,...], rng) -> (state, info) running K updates in one lax.scan:
    critic trains Q and V, policy trains π₀, joint both."""

    def step(state, batch, rng, phase: str):
        train = {"params": state["params"], "critic": {k: state["critic"][k] for k in ("q", "v")}}
        train["critic"]["target_q"] = state["target_critic"]
        policy = jax.lax.stop_gradient(acting_params(state))
        (_, info), g = jax.value_and_grad(total_loss, has_aux=True)(train, batch, rng, policy, phase, nets, args)
        new = dict(state)
        if phase in ("policy", "joint"):
            updates, new["opt"] = tx.update(g["params"], state["opt"], state["params"])
            new["params"] = optax.apply_updates(state["params"], updates)
            info["charts/grad_norm"] = optax.tree.norm(g["params"])
            if args.ema_decay > 0:  # θ̄ ← d·θ̄ + (1 − d)·θ
                new["ema"] = optax.incremental_update(new["params"], state["ema"], 1 - args.ema_decay)
        if phase in ("critic", "joint"):
            g_critic = {k: g["critic"][k] for k in ("q", "v")}
            updates, new["critic_opt"] = critic_tx.update(g_critic, state["critic_opt"], state["critic"])
            new["critic"] = optax.apply_updates(state["critic"], updates)
            new["target_critic"] = optax.incremental_update(new["critic"]["q"], state["target_critic"], args.tau)
        return new, info

    phases = ("critic", "policy") if args.schedule == "two-phase" else ("critic", "joint")
    return {p: mesh.scan_updates(partial(step, phase=p), shardings) for p in phases}


def make_advantage(nets: Nets, episodes: data.EpisodeData, chunks: data.ChunkDataset):
    """A = min Q̄(x, A_data) − V(x) of the dataset chunks `i`, from precomputed views of every frame (after the critic
    phase)."""

    @jax.jit
    def value_gap(state, obs_z, actions, states):
        chunk = nets.io.executed(nets.io.to_model(actions, states))
        q = q_values(nets, state["target_critic"], obs_z, chunk).min(0)
        return q - value(nets, state["critic"]["v"], obs_z)

    def advantage(state, views, i):
        o = chunks.obs_idx[i]
        return value_gap(state, views[o], episodes.actions[chunks.action_idx[i]], episodes.obs["state"][o])

    return advantage


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(nets: Nets, args: Args):
    """The policy: π₀'s chunk from one noise draw scaled by --eval-noise, the first H actions in env units."""
    sample = partial(pi0.sample_env_actions, nets.pi, nets.io, steps=args.flow_steps, noise_scale=args.eval_noise)
    return jax.jit(sample)


def evaluate(act, state, args: Args, spec: envs.EnvSpec, rng, run: runlog.Run, step: int) -> dict:
    """The policy from one noise draw (scaled by --eval-noise), --eval-episodes spread over --eval-envs envs; the same
    episodes (env seeds, noise: the same `rng`) at every evaluation. --capture-video: the first --video-episodes
    written as videos (`run.log_videos`)."""
    t = time.time()
    where = dict(episodes=args.eval_episodes, num_envs=args.eval_envs, seed=args.seed + 10_000)
    where.update(record=args.recorded_episodes, horizon=args.action_horizon, gamma=args.gamma)
    weights = {"": acting_params(state)}
    if args.eval_raw and state["ema"]:
        weights["raw_"] = state["params"]
    out = {}
    for prefix, params in weights.items():
        policy = lambda obs, key, params=params: (act(params, obs, key), None)
        metrics, trace = envs.evaluate(spec, policy, rng, prefix=prefix, **where)
        run.log_videos(step, f"pi0{'_raw' if prefix else ''}", trace.videos)
        out.update(metrics)
    out["time/eval_s"] = time.time() - t
    return out


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    # ---- setup: flags, devices, env, data, π₀, networks, optimisers, state
    args = check(args)
    dev_mesh = mesh.make_mesh(args.fsdp_devices)
    mesh.check_split(dev_mesh, {"--batch-size": args.batch_size, "--critic-batch-size": args.critic_batch_size})
    k_init, k_run, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    k_pi, k_q, k_v = jax.random.split(k_init, 3)
    spec = envs.make_spec(args.env, args.env_kwargs, args.dataset)
    env = spec.make(1, args.seed)  # only its spaces, cameras and prompts are needed here
    env.close()
    envs.check_horizon(env, args.action_horizon, args.env)
    path = args.dataset or envs.default_dataset(env="push", noise="mixed", episodes=args.episodes)
    episodes = data.load_dataset(path, env, spec.image_size)
    chunks = data.make_chunks(episodes, args.action_horizon, args.gamma)
    envs.check_batch(chunks, args.batch_size, "--batch-size")
    stats = data.norm_stats(episodes)
    policy = runlog.make_policy(
        env, episodes.prompts, stats, k_pi, action_horizon=args.action_horizon, **args.pi0_flags()
    )
    cfg = policy.model.config
    print(f"{len(episodes.episode_lengths)} episodes, {len(chunks)} chunks of H={args.action_horizon} from {path}")
    units = return_units(chunks)
    if args.reward == "subgoal":  # sub-goal flags are 0/1 rewards of their own: unscaled
        units = return_units(None)
    nets = Nets(policy.model, policy.io, MLP(tuple(args.critic_hidden)), MLP(tuple(args.critic_hidden)), *units)
    params = policy.params
    z = jnp.zeros((1, cfg.vlm.width + (cfg.state_dim or cfg.action_dim)))
    x = jnp.zeros((1, z.shape[1] + args.action_horizon * env.action_dim))
    q = jax.jit(jax.vmap(lambda k: nets.q.init(k, x)["params"]))(jax.random.split(k_q, 2))  # twin critics
    critic = {"q": q, "v": nets.v.init(k_v, z)["params"]}
    tx, critic_tx = make_optimizers(args)
    state = {"params": params, "opt": tx.init(params), "critic": critic, "critic_opt": critic_tx.init(critic)}
    state["target_critic"] = jax.tree.map(jnp.copy, q)
    state["ema"] = jax.tree.map(jnp.copy, params) if args.ema_decay > 0 else {}  # θ̄, sharded as θ
    state["adv"] = jnp.zeros(len(chunks), jnp.float32)  # A of every dataset chunk, set after the critic phase
    shardings = mesh.fsdp_sharding(state, dev_mesh)  # π₀ and its moments sharded; the critics small: replicated
    state = jax.device_put(state, shardings)
    run = runlog.Run(args, "chunk_awr")
    critic_steps = args.critic_steps if args.schedule == "two-phase" and args.beta > 0 else 0
    total = critic_steps + args.policy_steps

    # ---- restore
    step, train_s = 0, 0.0
    restored = run.restore(state)
    if restored is not None:
        step, state, extra, _ = restored
        state = jax.device_put(state, shardings)
        train_s = extra["train_s"]

    def save(step):
        run.save(step, state, {"step": step, **policy.record(), "train_s": train_s})

    # ---- loop: Q and V on the frozen initial π₀'s features, then π₀ by advantage-weighted flow matching
    updates = make_update(nets, args, tx, critic_tx, shardings)
    advantage = make_advantage(nets, episodes, chunks)
    act = mesh.host_local(make_act(nets, args), dev_mesh)  # each process acts on its own evaluation envs
    views, cdf, result, last_eval = None, None, {}, step  # an evaluation at the restored step came before its save
    bootstrap = args.critic_target == "mc" and args.truncation == "bootstrap" and bool(chunks.end_discount.any())

    @jax.jit
    def encode(params, obs):  # the critics' view [B,W+S] of observations, without gradients
        prefix = nets.pi.prefix(params, nets.io.observe(obs))
        return critic_obs(prefix.features, prefix.state)

    def encode_all(params):  # every frame once, with the frozen initial π₀ (critic phase)
        return mesh.map_batches(lambda i: encode(params, data.gather_obs(episodes.obs, i)), len(episodes), 4096)

    def do_eval(step):
        nonlocal result, last_eval
        result = evaluate(act, state, args, spec, k_eval, run, step)
        result["time/train_s"] = train_s
        run.log(step, result)
        last_eval = step
        print(f"[eval] update {step}: success {result['eval/success_rate']:.2f} (train {train_s:.0f}s)", flush=True)

    def batches(n, size, phase):  # n batches stacked [n,B,...] on the mesh
        rows, np_rng = [], np.random.default_rng([args.seed, step])  # the data order, a function of the step
        for _ in range(n):
            if phase == "policy" and cdf is not None:  # weighted sampling: P(i) ∝ w_i (inverse CDF)
                i = np.minimum(np.searchsorted(cdf, np_rng.uniform(0, cdf[-1], size)), len(chunks) - 1)
            else:
                i = np_rng.integers(0, len(chunks), size)
            frozen = phase == "critic" and views is not None  # frozen π₀: views precomputed per frame, no images
            td_next = phase != "policy" and args.critic_target == "td"  # o_{t+H} is read by the TD target only
            keys = [k for k in data.CHUNK_KEYS if k != "rewards"]  # no loss reads the per-step rewards
            keys.append("actions")
            if not frozen:
                keys.append("obs")
            if td_next and not frozen:
                keys.append("next_obs")
            b = chunks.get(i, tuple(keys))
            if frozen:  # the chunk's state alone (π₀'s relative action form) and the views of o_t (and o_{t+H})
                o = chunks.obs_idx[i]
                b["obs"] = {"state": episodes.obs["state"][o]}
                b["obs_z"] = views[o]
                if td_next:
                    b["next_obs_z"] = views[chunks.next_obs_idx[i]]
            if phase != "policy" and bootstrap:  # mc: the value of a truncated episode's last frame o_{L−1}
                b["return_to_end"] = chunks.return_to_end[i]
                b["end_discount"] = chunks.end_discount[i]
                e = chunks.end_obs_idx[i]
                if frozen:
                    b["end_obs_z"] = views[e]
                else:
                    b["end_obs"] = data.gather_obs(episodes.obs, e)
            if phase == "policy" and cdf is None:
                b["adv"] = adv_table[i]
            elif phase == "policy":  # the weights chose the chunks: the loss gets w = exp(0) = 1
                b["adv"] = np.zeros(size, np.float32)
            rows.append(b)
        return mesh.stack_batches(rows, dev_mesh)

    phase_2 = "policy" if args.schedule == "two-phase" else "joint"
    for phase, end in (("critic", critic_steps), (phase_2, total)):
        t_phase, s_phase, phase_s = time.time(), step, 0.0
        if phase == "critic" and step < end and args.value_loss == "expectile":
            views = encode_all(state["params"])
            print(f"[critic] features of {len(episodes)} frames in {time.time() - t_phase:.1f}s")
        if phase != "critic":  # the advantages of every dataset chunk, once (two-phase), pick the chunks
            adv_table = mesh.to_host(state["adv"])
            if args.weighting == "sample" and args.beta > 0 and phase == "policy":
                cdf = np.cumsum(np.minimum(np.exp(args.beta * adv_table.astype(np.float64)), args.max_weight))
            if step == 0:  # the start of π₀'s training without a critic phase: evaluate
                do_eval(step)
            t_phase = time.time()
        while step < end and not (phase != "critic" and args.time_budget_s and train_s >= args.time_budget_s):
            t = time.time()
            n = min(args.updates_per_call * (5 if phase == "critic" else 1), end - step)
            size = args.critic_batch_size if phase == "critic" else args.batch_size
            state, info = updates[phase](state, batches(n, size, phase), jax.random.fold_in(k_run, step))
            info = jax.block_until_ready(info)  # the budget counts the compute, not the asynchronous dispatch
            prev, step = step, step + n
            train_s += mesh.agreed(time.time() - t)  # one clock: every process stops at the same update
            phase_s += time.time() - t
            # ---- log
            if runlog.crossed(prev, step, args.log_every) or step == end:
                run.report(step, info, phase, total, (s_phase, t_phase), ("losses/q", "losses/v", "losses/policy"))
            # ---- evaluate
            if phase != "critic" and runlog.crossed(prev, step, args.eval_every, critic_steps):
                do_eval(step)
            # ---- save (SIGINT / SIGTERM: save here and exit)
            if (runlog.crossed(prev, step, args.save_every) or run.stopping) and step != end:
                save(step)
        if phase == "critic" and step > s_phase:  # A = min Q̄ − V of every dataset chunk, once
            views = views if views is not None else encode_all(state["params"])
            adv = mesh.map_batches(partial(advantage, state, views), len(chunks), 8192)
            spread = float(adv.std()) + 1e-6  # in critic units; × ret_sigma in reward units
            adv = adv / spread  # β in units of the advantages' spread: the same weights at any reward scale
            state["adv"] = jax.device_put(adv, shardings["adv"])
            views = None
            w = np.minimum(np.exp(args.beta * adv), args.max_weight)
            clipped = (w >= args.max_weight).mean()
            print(
                f"[critic] advantage std {spread * nets.ret_sigma:.4g}; weights {w.mean():.3g}, {clipped:.1%} clipped"
            )
            train_s = mesh.agreed(time.time() - t_phase)  # the whole critic phase counts as training
            do_eval(step)  # the start of π₀'s training
            save(step)
    if last_eval != step:  # the final evaluation, unless one just ran
        do_eval(step)
    save(step)
    spec.close()  # the evaluation envs it kept
    run.close()
    out = {**result, "step": step, "policy_updates": step - critic_steps, "run_dir": run.dir, "time/train_s": train_s}
    out["time/policy_updates_per_s"] = (step - s_phase) / max(phase_s, 1e-9)
    return out


if __name__ == "__main__":
    with runlog.one_line_errors():
        main(runlog.cli(Args, CONFIGS))
