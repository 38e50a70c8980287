"""PPO on π₀ through a stochastic denoising chain: flow-noise and flow-SDE.

The deterministic Euler sampler of a flow policy has no likelihood. Making the K denoising steps stochastic gives
every action chunk a tractable one: the chain x_0 → x_1 → … → x_K (x_0 ~ N(0, I) at flow time t=1, the action x_K at
t=0, δ = 1/K) is a product of Gaussians, and PPO (Schulman et al. 2017) optimises the ratio of chain likelihoods.
  --noise-method flow_noise (ReinFlow, Zhang et al. 2025; πRL's flow-noise, Chen et al. 2025):
      x_{k+1} ~ N(x_k − δ·v(x_k, t_k), σ_k²), σ_k from a learned noise head on the action expert's outputs, bounded in
      [min_std, max_std]. log π(chain) = log N(x_0; 0, I) + Σ_k log N(x_{k+1}; μ_k, σ_k²), averaged over the K+1
      terms (--logprob-reduce mean) or summed; the Gaussian entropy of the σ_k is the entropy bonus.
  --noise-method flow_sde (Flow-GRPO, Liu et al. 2025; πRL's flow-SDE): the reverse SDE with the flow ODE's marginals,
      σ_t = a·√(t/(1−t)), μ = x − δ·[v + σ_t²/(2t)·(x + (1−t)·v)], std σ_t·√δ (the score of x_t = t·ε + (1−t)·a is
      −(x + (1−t)·v)/t); one random step per chunk is stochastic, the others are the ODE; log π = that step's Gaussian.
Rollouts run chunks open loop in vectorised envs (old and new log-likelihoods both from `chain_logprob`: the first
ratio is 1); GAE(γ^H, λ) over chunk steps; clipped PPO (optional dual clip); a clipped value loss on a value head over
the detached prefix features, in running-return units (--norm-value); evaluation uses the deterministic ODE. The BC
warm start averages π₀'s weights over its updates (--ema-decay, openpi's EMA) and PPO starts from that average.

  python flow_ppo.py                                     # push, CPU π₀ preset, BC warm start then PPO, < 10 min
  python flow_ppo.py --env libero --no-freeze-backbone   # GPUs: openpi's pi0_libero from its cache, no BC
  python flow_ppo.py --bc-steps 20 --iterations 2 --num-envs 8 --num-steps 4 --eval-episodes 8   # smoke
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
    # ---- env and cadence (steps: BC updates, then PPO iterations)
    action_horizon: int = 5
    """H, the chunk length executed open loop"""
    num_envs: int = 128
    """parallel environments a rollout runs"""
    eval_episodes: int = 200
    """episodes per evaluation (the same ones every time)"""
    eval_envs: int = 200
    """environments an evaluation plays its episodes on (at most --eval-episodes are used)"""
    log_every: int = 5
    """log metrics every this many PPO iterations (BC: every 10× this many updates; 0: only at the end of each phase)"""
    eval_every: int = 20
    """evaluate every this many PPO iterations, and at the start and end of PPO (0: only then)"""
    save_every: int = 50
    """checkpoint every this many PPO iterations (BC: 10× this many updates), at the end and on SIGINT/SIGTERM (0:
    only then)"""

    # ---- model
    flow_steps: int = 4
    """K: Euler steps, the same in rollouts and evaluation"""
    freeze_backbone: bool = True
    """PPO: keep the VLM (prefix) fixed, train the action expert, projections and heads (stable value features)"""
    bc_steps: int = 10_000
    """flow-matching BC updates on the prior data before PPO (0, or a --pi0-checkpoint: none)"""
    bc_batch_size: int = 64
    """BC batch size"""
    bc_lr: float = 1e-3
    """BC learning rate"""
    ema_decay: float = 0.999
    """d of π₀'s weights averaged over the BC updates, θ̄ ← d·θ̄ + (1 − d)·θ (openpi's EMA); PPO starts from θ̄ and keeps
    no average: the rollouts must come from the weights whose log-likelihoods the ratio assumes (0: off)"""
    updates_per_call: int = 10
    """BC updates per jitted call (lax.scan)"""

    # ---- algorithm
    noise_method: Literal["flow_noise", "flow_sde"] = "flow_noise"
    """how the denoising chain is made stochastic"""
    iterations: int = 200
    """PPO iterations (rollout + update)"""
    time_budget_s: float = 0.0
    """stop PPO after this many seconds of it (evaluation excluded; 0: none; unlike --iterations, not reproducible)"""
    num_steps: int = 8
    """chunk steps per env per rollout"""
    gamma: float = 0.99
    """per-env-step discount; a chunk step discounts by gamma**H"""
    gae_lambda: float = 0.95
    """GAE λ over chunk steps"""
    update_epochs: int = 2
    """epochs over each rollout"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    lr: float = 1e-4
    """policy (π₀ + noise head) learning rate"""
    value_lr: float = 1e-3
    """value head learning rate"""
    norm_value: bool = True
    """the value head in units of the running return mean and std (any reward scale: the same run)"""
    critic_warmup: int = 5
    """first iterations that train only the value head (fitted before π₀ moves)"""
    lr_ramp: int = 0
    """iterations after the warm-up over which the policy lr rises linearly from ~0"""
    clip_coef: float = 0.2
    """PPO ratio clip ε"""
    dual_clip: float = 0.0
    """dual-clip constant c > 1 for negative advantages (0: off)"""
    vf_coef: float = 0.5
    """value loss weight"""
    clip_vloss: bool = True
    """clip the value update around the old values (by ±clip_coef)"""
    ent_coef: float = 0.0
    """entropy bonus weight (flow_noise)"""
    target_kl: float | None = 0.02
    """skip the rest of the update once the approximate KL exceeds this"""
    logprob_reduce: Literal["mean", "sum"] = "mean"
    """average or sum the chain's log-likelihood terms"""
    min_std: float = 0.05
    """flow_noise: lower bound of the per-step noise std (normalised action units)"""
    max_std: float = 0.25
    """flow_noise: upper bound of the per-step noise std"""
    sde_noise_level: float = 0.5
    """flow_sde: a in σ_t = a·√(t/(1−t)) (t clipped to 1−δ at the first step)"""


# The flags that depend on the env, per env (--env picks one; "gym": any other gymnasium id; push's are the defaults).
# libero and gym take a lower lr and a longer value warm-up: they protect a good start where successes are sparse
# (docs/results/ogbench.md).
CONFIGS = {
    "push": Args(
        env="push",
        action_horizon=5,
        num_envs=128,
        eval_episodes=200,
        eval_envs=200,
        pi0_preset="cpu",
        lr=1e-4,
        critic_warmup=5,
    ),
    "libero": Args(
        env="libero",
        action_horizon=10,
        num_envs=16,
        eval_episodes=50,
        eval_envs=16,
        pi0_preset="pi0",
        lr=3e-5,
        critic_warmup=25,
    ),
    "gym": Args(
        env="gym",
        action_horizon=5,
        num_envs=16,
        eval_episodes=200,
        eval_envs=16,
        pi0_preset="cpu",
        lr=3e-5,
        critic_warmup=25,
    ),
}


def check(args: Args) -> Args:
    """The run's flags (a resumed run's own), LIBERO's inputs found in the caches; inconsistent flags refused."""
    args = runlog.prepared(args, "flow_ppo", CONFIGS, data_with_checkpoint="unused")  # a checkpoint: no BC
    runlog.check_at_least(args, 1, "num_envs", "num_steps", "flow_steps", "update_epochs", "num_minibatches")
    runlog.check_at_least(args, 1, "updates_per_call", "bc_batch_size", "action_horizon", "eval_episodes", "eval_envs")
    runlog.check_at_least(args, 0, "iterations", "bc_steps", "lr_ramp", "critic_warmup")
    runlog.check_at_least(args, 0, "log_every", "eval_every", "save_every")
    runlog.check_ranges(args, gamma=(0, 1), lr=(0, None), bc_lr=(0, None), value_lr=(0, None))
    runlog.check_ranges(args, min_std=(0, args.max_std))
    runlog.check_ema(args.ema_decay, args.bc_steps, "BC updates")
    if (n := args.num_envs * args.num_steps) % args.num_minibatches:
        raise RunError(f"num_envs × num_steps ({n}) must be divisible by --num-minibatches ({args.num_minibatches})")
    if args.noise_method == "flow_sde" and args.flow_steps < 2:
        raise RunError("flow_sde needs --flow-steps ≥ 2 (σ_t is evaluated at t ≤ 1 − δ, which is 0 for one step)")
    return args


# ----------------------------------------------------------------------------------------------------- networks
class NoiseHead(nn.Module):
    """Per-step, per-dimension std from the (detached) action-expert outputs, bounded in [min_std, max_std]."""

    action_dim: int
    min_std: float
    max_std: float

    @nn.compact
    def __call__(self, out):  # [B,N,H,W] -> [B,N,H,A]
        z = nn.Dense(self.action_dim, kernel_init=nn.initializers.normal(1e-2))(jax.lax.stop_gradient(out))
        return self.min_std + (self.max_std - self.min_std) * nn.sigmoid(z.astype(jnp.float32))


class ValueHead(nn.Module):
    """V(o) from the pooled prefix features and the normalised state (both detached)."""

    @nn.compact
    def __call__(self, features, state):  # [B,W], [B,S] -> [B]
        x = jax.lax.stop_gradient(jnp.concatenate([features, state], -1).astype(jnp.float32))
        for _ in range(2):
            x = nn.tanh(nn.Dense(256)(x))
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0]


@dataclass(frozen=True)
class Nets:
    """π₀, the env ↔ π₀ plumbing and the heads: what the losses and the acting functions close over."""

    pi: pi0.Pi0
    io: pi0.EnvIO
    noise_head: NoiseHead
    value_head: ValueHead


def gaussian_logpdf(x, mean, std, mask):
    """log N(x; mean, std²) summed over the trailing H, A axes where mask [H,A] is 1 (executed). [..., H, A] -> [...]"""
    return jnp.sum(mask * (-0.5 * jnp.square((x - mean) / std) - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)), (-2, -1))


def flow_times(k: int):  # t_0..t_{K-1} of the Euler steps (t=1 noise → t=0 action) and the step size δ
    return 1.0 - jnp.arange(k, dtype=jnp.float32) / k, 1.0 / k


def transition(nets: Nets, args: Args, heads, v, out, x, t, delta):
    """The stochastic step's Gaussian (mean, std) at x_k, t_k (shapes [B,N,H,A], t [B,N]); ODE mean for flow_sde too."""
    if args.noise_method == "flow_noise":
        return x - delta * v, nets.noise_head.apply(heads["noise"], out)
    tt = t[..., None, None]
    sigma = args.sde_noise_level * jnp.sqrt(jnp.minimum(tt, 1.0 - delta) / (1.0 - jnp.minimum(tt, 1.0 - delta)))
    mean = x - delta * (v + sigma**2 / (2 * tt) * (x + (1 - tt) * v))
    return mean, jnp.broadcast_to(sigma * jnp.sqrt(delta), x.shape)


def chain_logprob(nets: Nets, args: Args, params, heads, prefix, chain, sde_step, mask):
    """log π(chain), entropy, mean std of the stochastic steps where `mask` [H,A] is 1 (`EnvIO.executed_mask`: what
    reaches the env). chain [B,K+1,H,A], sde_step [B] -> [B], [B], [B]. Used at rollout (the old log-likelihood) and
    in the loss, on the same stored chain; flow_noise's K steps are N=K candidates sharing one prefix cache."""
    B, K, rows = chain.shape[0], chain.shape[1] - 1, jnp.arange(chain.shape[0])
    times, delta = flow_times(K)
    if args.noise_method == "flow_noise":  # x_k -> x_{k+1} for every k: [B,K,H,A], [B,K]
        x, t, nxt = chain[:, :K], jnp.broadcast_to(times, (B, K)), chain[:, 1:]
    else:  # the one stochastic step: [B,1,H,A], [B,1]
        x, t, nxt = chain[rows, sde_step][:, None], times[sde_step][:, None], chain[rows, sde_step + 1][:, None]
    v, out = nets.pi.velocity(params, prefix, x, t)
    mean, std = transition(nets, args, heads, v, out, x, t, delta)
    terms = gaussian_logpdf(nxt, mean, std, mask)  # [B,K] or [B,1]
    if args.noise_method == "flow_noise":  # with log N(x_0; 0, I): constant, part of the chain's density
        terms = jnp.concatenate([gaussian_logpdf(chain[:, 0], 0.0, 1.0, mask)[:, None], terms], axis=1)
        logp = terms.mean(1) if args.logprob_reduce == "mean" else terms.sum(1)
    else:
        logp = terms[:, 0]
    mean_over = lambda x: jnp.mean(jnp.sum(mask * x, axis=(2, 3)) / mask.sum(), axis=1)  # [B,N,H,A] -> [B]
    return logp, mean_over(0.5 * jnp.log(2 * jnp.pi * jnp.e) + jnp.log(std)), mean_over(std)


def sample_chain(nets: Nets, args: Args, params, heads, prefix, rng, batch: int):
    """Sample the stochastic chain. -> chain [B,K+1,H,A], sde_step [B] (the stochastic step of flow_sde)."""
    K, c = args.flow_steps, nets.pi.config
    times, delta = flow_times(K)
    k0, k_step, k_noise = jax.random.split(rng, 3)
    sde_step = jax.random.randint(k_step, (batch,), 0, K)
    eps = jax.random.normal(k_noise, (K, batch, 1, c.action_horizon, c.action_dim))

    def step(x, inp):  # x [B,1,H,A]
        k, e = inp
        t = jnp.full((batch, 1), times[k])
        v, out = nets.pi.velocity(params, prefix, x, t)
        mean, std = transition(nets, args, heads, v, out, x, t, delta)
        if args.noise_method == "flow_noise":
            nxt = mean + std * e
        else:  # only step `sde_step` is stochastic; the others follow the ODE
            nxt = jnp.where((sde_step == k)[:, None, None, None], mean + std * e, x - delta * v)
        return nxt, nxt[:, 0]

    x0 = jax.random.normal(k0, (batch, 1, c.action_horizon, c.action_dim))
    _, xs = jax.lax.scan(step, x0, (jnp.arange(K), eps))
    return jnp.concatenate([x0, jnp.moveaxis(xs, 0, 1)], axis=1), sde_step


# ----------------------------------------------------------------------------------------------------- losses
def bc_loss(params, prefix, batch, rng, nets: Nets):
    """Flow-matching BC on the prior data's chunks (the warm start), weighted by valid. -> (loss, info)."""
    actions = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m], relative where π₀ is
    w = nets.io.step_weights(batch["valid"].astype(jnp.float32))  # [B,H_m]: 0 past the episode's end, discarded
    per_step = nets.pi.flow_loss(params, prefix, actions, rng)
    loss = jnp.sum(per_step * w) / jnp.maximum(w.sum(), 1.0)
    return loss, {"losses/bc": loss}


def ppo_loss(train, batch, rng, nets: Nets, args: Args):  # rng unused: the stored chains carry the randomness
    """Clipped PPO on the chain likelihood + clipped value loss − entropy bonus. -> (loss, info)."""
    obs = nets.io.observe(batch["obs"])
    prefix = nets.pi.prefix(train["params"], obs)  # inside the loss: the backbone may train (--no-freeze-backbone)
    prefix = jax.lax.stop_gradient(prefix) if args.freeze_backbone else prefix  # frozen: no backward pass through it
    mask = nets.io.executed_mask()
    chain = (batch["chain"], batch["sde_step"])
    logp, entropy, std = chain_logprob(nets, args, train["params"], train["heads"], prefix, *chain, mask)
    logratio = logp - jax.lax.stop_gradient(batch["logp"])  # the old log-likelihood, stored at rollout
    ratio = jnp.exp(logratio)
    adv = jax.lax.stop_gradient(batch["advantages"])  # normalised over the whole rollout in `update`
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
    if args.dual_clip > 1.0:  # Ye et al. 2020: bound the loss of negative advantages at c·|A|
        pg = jnp.where(adv < 0, jnp.minimum(pg, -args.dual_clip * adv), pg)
    pg_loss = pg.mean()
    value = nets.value_head.apply(train["heads"]["value"], prefix.features, obs.state)  # reads detached features
    ret, old_v = jax.lax.stop_gradient(batch["returns"]), jax.lax.stop_gradient(batch["values"])  # normalised
    v_loss = jnp.square(value - ret)
    if args.clip_vloss:
        v_clip = old_v + jnp.clip(value - old_v, -args.clip_coef, args.clip_coef)
        v_loss = jnp.maximum(v_loss, jnp.square(v_clip - ret))
    v_loss, ent = 0.5 * v_loss.mean(), entropy.mean()
    policy_term = jnp.where(batch["train_policy"], pg_loss - args.ent_coef * ent, 0.0)  # value-only warm-up
    loss = policy_term + args.vf_coef * v_loss
    info = {"losses/policy": pg_loss, "losses/value": v_loss, "losses/entropy": ent, "charts/noise_std": std.mean()}
    info["losses/approx_kl"], info["charts/ratio_mean"] = jnp.mean((ratio - 1) - logratio), ratio.mean()
    info |= {"charts/clip_frac": (abs(ratio - 1) > args.clip_coef).mean(), "charts/ratio_max_dev": abs(ratio - 1).max()}
    return loss, info


# ----------------------------------------------------------------------------------------------------- update
def make_optimizers(args: Args, nets: Nets, train):
    """PPO: clipped Adam (eps 1e-5, as CleanRL's PPO), the policy's (π₀ + noise head; it skips the value-only warm-up,
    whose zero gradients would void its bias correction) and the value head's own; BC: clipped Adam."""

    def adam(lr):
        return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(lr, eps=1e-5))

    labels = {"params": nets.pi.optimizer_labels(train["params"], "policy", args.freeze_backbone)}
    labels["heads"] = {"noise": "policy", "value": "value"}  # a prefix of the heads' trees
    n = args.lr_ramp * args.update_epochs * args.num_minibatches  # the ramp in the policy's own Adam steps
    lr = args.lr
    if n:
        lr = optax.linear_schedule(args.lr / n, args.lr, n)
    policy = optax.transforms.conditionally_mask(adam(lr), lambda _, train_policy: train_policy, True)
    txs = {"policy": policy, "value": adam(args.value_lr), "frozen": optax.set_to_zero()}
    bc_tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.bc_lr))
    return optax.multi_transform(txs, labels), bc_tx


def make_update(nets: Nets, args: Args, tx, bc_tx):
    """The BC update (state, batches [K,B,...], rng) -> (state, info), K updates in one lax.scan, and the PPO update
    (state, rollout batch, rng, train_policy) -> (state, info), epochs × minibatches in one lax.scan."""

    def bc_objective(params, batch, rng):  # the VLM trains in the warm start: its pass is inside the gradient
        prefix = nets.pi.prefix(params, nets.io.observe(batch["obs"]))
        return bc_loss(params, prefix, batch, rng, nets)

    def bc_step(state, batch, rng):
        (_, info), g = jax.value_and_grad(bc_objective, has_aux=True)(state["params"], batch, rng)
        updates, bc_opt = bc_tx.update(g, state["bc_opt"], state["params"])
        new = {**state, "params": optax.apply_updates(state["params"], updates), "bc_opt": bc_opt}
        if state["ema"]:  # θ̄ ← d·θ̄ + (1 − d)·θ
            new["ema"] = optax.incremental_update(new["params"], state["ema"], 1 - args.ema_decay)
        return new, info

    def minibatch_step(carry, mb):
        state, stopped = carry
        train = {"params": state["params"], "heads": state["heads"]}
        grads, info = jax.grad(ppo_loss, has_aux=True)(train, mb, None, nets, args)
        updates, opt = tx.update(grads, state["opt"], train, train_policy=mb["train_policy"])
        new_state = {**state, **optax.apply_updates(train, updates), "opt": opt}  # params, heads and their moments
        new_state = jax.tree.map(lambda n, o: jnp.where(stopped, o, n), new_state, state)  # KL early stop: no update
        if args.target_kl is not None:
            stopped = stopped | (info["losses/approx_kl"] > args.target_kl)
        info["charts/grad_norm"] = optax.tree.norm(grads)
        return (new_state, stopped), info

    def ppo_update(state, batch, rng, train_policy):
        adv, n, ret = batch["advantages"], batch["logp"].shape[0], batch["returns"]
        batch = {**batch, "advantages": (adv - adv.mean()) / (adv.std() + 1e-8)}  # normalised over the rollout
        explained = 1.0 - jnp.var(ret - batch["values"]) / (jnp.var(ret) + 1e-8)  # of the values that made the GAE
        if args.norm_value:  # the value head's units: mean and std of all returns seen (Chan et al.'s combination)
            s, m = state["ret_stats"], ret.size
            delta, count = ret.mean() - s["mean"], s["count"] + m
            var = (s["var"] * s["count"] + ret.var() * m + delta**2 * s["count"] * m / count) / count
            state = {**state, "ret_stats": {"mean": s["mean"] + delta * m / count, "var": var, "count": count}}
        norm = lambda x: (x - state["ret_stats"]["mean"]) / jnp.sqrt(state["ret_stats"]["var"] + 1e-8)
        batch.update(returns=norm(ret), values=norm(batch["values"]))
        mb_size = n // args.num_minibatches

        def epoch(carry, key):
            perm = jax.random.permutation(key, n)[: mb_size * args.num_minibatches]
            mbs = jax.tree.map(lambda x: x[perm].reshape(args.num_minibatches, mb_size, *x.shape[1:]), batch)
            mbs["train_policy"] = jnp.broadcast_to(train_policy, (args.num_minibatches,))
            return jax.lax.scan(minibatch_step, carry, mbs)

        keys = jax.random.split(rng, args.update_epochs)
        (state, stopped), info = jax.lax.scan(epoch, (state, jnp.bool_(False)), keys)
        out = jax.tree.map(jnp.mean, info)
        out["charts/first_ratio_dev"] = info["charts/ratio_max_dev"][0, 0]  # first minibatch of the first epoch
        out["charts/kl_stopped"], out["charts/explained_variance"] = stopped.astype(jnp.float32), explained
        out["charts/return_mean"], out["charts/return_std"] = ret.mean(), jnp.sqrt(state["ret_stats"]["var"])
        return state, out

    return mesh.scan_updates(bc_step), jax.jit(ppo_update, donate_argnums=0)


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(nets: Nets, args: Args):
    """The rollout policy (chain, log-likelihood, value), the value alone, the evaluation policy (the ODE)."""
    value = lambda state, prefix, o: nets.value_head.apply(state["heads"]["value"], prefix.features, o.state)
    in_units = lambda stats, v: stats["mean"] + jnp.sqrt(stats["var"] + 1e-8) * v  # return units (--norm-value)

    @jax.jit
    def act(state, obs, rng):
        o, params, heads = nets.io.observe(obs), state["params"], state["heads"]
        prefix = nets.pi.prefix(params, o)
        chain, sde_step = sample_chain(nets, args, params, heads, prefix, rng, o.state.shape[0])
        logp, _, _ = chain_logprob(nets, args, params, heads, prefix, chain, sde_step, nets.io.executed_mask())
        v = in_units(state["ret_stats"], value(state, prefix, o))
        return nets.io.to_env(chain[:, -1], obs["state"]), chain, sde_step, logp, v

    @jax.jit
    def value_fn(state, obs):
        o = nets.io.observe(obs)
        return in_units(state["ret_stats"], value(state, nets.pi.prefix(state["params"], o), o))

    eval_act = jax.jit(partial(pi0.sample_env_actions, nets.pi, nets.io, steps=args.flow_steps))
    return act, value_fn, eval_act


def evaluate(eval_act, state, args: Args, spec: envs.EnvSpec, rng, label: str, run: runlog.Run, step: int) -> dict:
    """The ODE policy on the same episodes at every evaluation (one `rng`: env seeds, initial noise); printed.
    --capture-video: the first --video-episodes written as videos (`run.log_videos`)."""
    policy = lambda obs, key: (eval_act(state["params"], obs, key), None)
    where = dict(episodes=args.eval_episodes, num_envs=args.eval_envs, seed=args.seed + 10_000)
    where.update(record=args.recorded_episodes)
    out, trace = envs.evaluate(spec, policy, rng, horizon=args.action_horizon, gamma=args.gamma, **where)
    run.log_videos(step, "pi0", trace.videos)
    print(f"[{label}] success {out['eval/success_rate']:.3f}", flush=True)
    return out


def gae(rewards, values, next_value, terminated, truncated, final_values, gamma_chunk: float, lam: float):
    """GAE(γ_c, λ) over chunk steps, [T,E] arrays -> (advantages, returns) [T,E]. A terminated chunk does not bootstrap,
    a truncated one from V(final obs) (folded into its reward); the recursion stops there (the env is reset)."""
    rewards = rewards + gamma_chunk * final_values * truncated
    ended = jnp.logical_or(terminated, truncated)
    next_values = jnp.concatenate([values[1:], next_value[None]], axis=0)

    def back(adv, inp):
        r, v, nv, done = inp
        delta = r + gamma_chunk * nv * (1.0 - done) - v
        adv = delta + gamma_chunk * lam * (1.0 - done) * adv
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros_like(next_value), (rewards, values, next_values, ended), reverse=True)
    return adv, adv + values


def rollout(act, value_fn, state, env, obs, rng, args: Args, dev_mesh):
    """--num-steps chunk steps in every env -> the PPO batch [E·T,...] (GAE(γ^H, λ) advantages) on the mesh (this
    process's envs' rows), the next obs, the success flags of the episodes that ended."""
    roll, ep_success = [], []  # per chunk step: {"obs": .., "chain": [E,K+1,H,A], ...}
    for t in range(args.num_steps):
        actions, chain, sde_step, logp, value = act(state, obs, jax.random.fold_in(rng, t))
        roll.append({"obs": obs, "chain": chain, "sde_step": sde_step, "logp": logp, "values": value})
        obs, cs = envs.execute_chunk(env, obs, np.asarray(actions), args.gamma)
        trunc = cs.truncated & ~cs.terminated  # V(final obs): a collective, made when any process needs it
        final_v = np.asarray(value_fn(state, cs.final_obs)) * trunc if mesh.anywhere(trunc.any()) else 0.0 * trunc
        roll[-1].update(rewards=cs.discounted_return, term=cs.terminated, trunc=trunc, final_v=final_v)
        ep_success += cs.success[cs.terminated | cs.truncated].tolist()
    r = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *roll)  # the T chunk steps stacked, [T,E,...]
    term, trunc = r["term"].astype(jnp.float32), r["trunc"].astype(jnp.float32)
    last_v, gamma_chunk = value_fn(state, obs), args.gamma**args.action_horizon  # a chunk step discounts by γ^H
    adv, ret = gae(r["rewards"], r["values"], last_v, term, trunc, r["final_v"], gamma_chunk, args.gae_lambda)
    flat = lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:])  # [T,E,...] -> [E·T,...]: envs in order, any processes
    batch = {k: jax.tree.map(flat, r[k]) for k in ("obs", "chain", "sde_step", "logp", "values")}
    batch.update(advantages=flat(adv), returns=flat(ret))
    return mesh.shard_batch(batch, dev_mesh), obs, np.array(ep_success, bool)


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict[str, float]:
    # ---- setup: flags, devices, env, data, π₀, networks, optimisers, state
    args = check(args)
    dev_mesh = mesh.make_mesh(args.fsdp_devices)
    rows = {"rollout rows (--num-envs × --num-steps)": args.num_envs * args.num_steps}  # split like a batch
    mesh.check_split(dev_mesh, {"--bc-batch-size": args.bc_batch_size, **rows})
    k_init, k_run, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    k_pi, k_noise, k_value = jax.random.split(k_init, 3)
    spec = envs.make_spec(args.env, args.env_kwargs, args.dataset)
    env = spec.make_share(args.num_envs, args.seed)  # this process's envs
    envs.check_horizon(env, args.action_horizon, args.env)
    bc_steps, chunks, stats, prompts = args.bc_steps, None, None, env.prompts
    if args.pi0_checkpoint:  # a checkpoint is the start of PPO, with its own norm stats
        bc_steps = 0
    else:  # the prior data: norm stats and the BC warm start
        path = args.dataset or envs.default_dataset("push")
        episodes = data.load_dataset(path, env, spec.image_size)
        chunks = data.make_chunks(episodes, args.action_horizon, args.gamma)
        envs.check_batch(chunks, args.bc_batch_size, "--bc-batch-size")
        stats, prompts = data.norm_stats(chunks.data), chunks.prompts
    policy = runlog.make_policy(env, prompts, stats, k_pi, action_horizon=args.action_horizon, **args.pi0_flags())
    cfg = policy.model.config
    nets = Nets(policy.model, policy.io, NoiseHead(cfg.action_dim, args.min_std, args.max_std), ValueHead())
    heads = {"noise": nets.noise_head.init(k_noise, jnp.zeros((1, 1, args.action_horizon, cfg.expert.width)))}
    z = (jnp.zeros((1, cfg.vlm.width)), jnp.zeros((1, cfg.state_dim or cfg.action_dim)))  # features, state
    train = {"params": policy.params, "heads": {**heads, "value": nets.value_head.init(k_value, *z)}}
    tx, bc_tx = make_optimizers(args, nets, train)
    state = {**train, "opt": tx.init(train), "bc_opt": {}}
    state["ema"] = {}  # θ̄, the BC updates' average of π₀'s weights (all of them train in BC), sharded as θ; BC only
    if bc_steps:
        state["bc_opt"] = bc_tx.init(train["params"])
        state["ema"] = jax.tree.map(jnp.copy, train["params"]) if args.ema_decay > 0 else {}
    state["ret_stats"] = {"mean": jnp.zeros(()), "var": jnp.ones(()), "count": jnp.zeros(())}  # --norm-value's
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))  # FSDP: π₀ and its moments sharded
    print(f"π₀ {pi0.param_count(state['params']) / 1e6:.2f}M params; {bc_steps} BC updates, {args.iterations} PPO its")
    run = runlog.Run(args, "flow_ppo")
    total = bc_steps + args.iterations

    # ---- restore: the train state, counters, and on the host the envs and the episodes since the last log
    step, obs, ep_success = 0, env.reset(seed=args.seed)[0], []
    counts = {"charts/env_steps": 0, "time/ppo_s": 0.0}  # continued across resumes (ppo_s: --time-budget-s)
    if (run.saved_step or 0) >= bc_steps:  # saved in PPO: θ̄ became θ at its start
        state["ema"] = {}
    restored = run.restore(state)
    if restored is not None:
        step, state, extra, host = restored
        counts = {k: extra[k] for k in counts}
        obs = envs.resume_loop(env, host["loop"], args.seed + step)
        ep_success = list(host["ep_success"])

    def save(step):
        host = {"loop": envs.loop_state(env, obs), "ep_success": ep_success}
        run.save(step, state, {"step": step, **policy.record(), **counts}, host)

    # ---- loop: BC warm start, then PPO (rollout, GAE, epochs × minibatches)
    bc_update, ppo_update = make_update(nets, args, tx, bc_tx)
    act, value_fn, eval_act = make_act(nets, args)
    act = mesh.host_local(act, dev_mesh)  # each process acts on its own envs
    value_fn = mesh.host_local(value_fn, dev_mesh)
    eval_act = mesh.host_local(eval_act, dev_mesh)
    final, info, first_dev = {}, {}, 0.0
    for phase, end in (("bc", bc_steps), ("ppo", total)):
        if phase == "ppo" and step == bc_steps != run.saved_step:  # the start of PPO (BC or the checkpoint), saved
            if state["ema"]:  # PPO starts from BC's average θ̄, and keeps no average
                state = {**state, "params": state["ema"], "ema": {}}
            final = evaluate(eval_act, state, args, spec, k_eval, "start of PPO", run, step)
            run.log(step, final)
            final["eval/start_success_rate"] = final["eval/success_rate"]
            save(step)
        t_phase, s_phase, phase_s = time.time(), step, 0.0
        start, scale, env_steps_per_step = 0, 10, 1  # BC: cadences in 10× as many updates
        if phase == "ppo":  # PPO: cadences in iterations counted from the start of PPO
            start, scale, env_steps_per_step = bc_steps, 1, args.num_envs * args.num_steps * args.action_horizon
        budget = args.time_budget_s if phase == "ppo" else 0.0  # --time-budget-s bounds PPO alone (0: no bound)
        while step < end and not 0 < budget <= counts["time/ppo_s"]:
            t = time.time()
            key = jax.random.fold_in(k_run, step)  # randomness and data order, a function of the step (resume)
            np_rng = np.random.default_rng([args.seed, step])
            if phase == "bc":  # flow matching on the prior data's chunks
                n = min(args.updates_per_call, end - step)
                bs = [chunks.sample(np_rng, args.bc_batch_size, ("obs", "actions", "valid")) for _ in range(n)]
                state, info = bc_update(state, mesh.stack_batches(bs, dev_mesh), key)
            else:  # one rollout, then epochs × minibatches of PPO on it
                n = 1
                batch, obs, done = rollout(act, value_fn, state, env, obs, key, args, dev_mesh)
                ep_success += mesh.all_rows(done).tolist()  # every process's rollout episodes since the last log
                counts["charts/env_steps"] += env_steps_per_step
                train_policy = jnp.bool_(step - bc_steps >= args.critic_warmup)
                state, info = ppo_update(state, batch, jax.random.fold_in(key, 1), train_policy)
                first_dev = max(first_dev, float(info["charts/first_ratio_dev"]))  # this session's
            prev, step = step, step + n
            dt = mesh.agreed(time.time() - t)  # one clock: every process stops at the same step
            phase_s += dt
            if phase == "ppo":
                counts["time/ppo_s"] += dt
            last = step == end or 0 < budget <= counts["time/ppo_s"]
            # ---- log
            if runlog.crossed(prev, step, scale * args.log_every, start) or last:
                sps = (step - s_phase) * env_steps_per_step / phase_s
                m = {**info, "charts/env_steps": counts["charts/env_steps"], "time/sps": sps}
                if ep_success:
                    m["charts/rollout_success"] = np.mean(ep_success)
                ep_success = []
                keys = ("losses/bc", "charts/rollout_success", "charts/noise_std", "losses/approx_kl")
                run.report(step, m, phase, total, (s_phase, t_phase), keys)
            # ---- evaluate
            if phase == "ppo" and (runlog.crossed(prev, step, args.eval_every, start) or last):
                ev = evaluate(eval_act, state, args, spec, k_eval, f"eval, it {step - start}", run, step)
                run.log(step, ev)
                final.update(ev)
            # ---- save (SIGINT / SIGTERM: here; BC's last step is saved at the start of PPO)
            saving = runlog.crossed(prev, step, scale * args.save_every, start) or last or run.stopping
            if saving and step != bc_steps:
                save(step)
    env.close()
    spec.close()  # the evaluation envs it kept
    run.close()
    final.update({k: float(v) for k, v in jax.device_get(info).items()})
    final.update(counts, run_dir=run.dir, step=step, iterations=step - bc_steps)
    final.update({"charts/first_ratio_dev_max": first_dev, "time/wall_s": phase_s})
    return final


if __name__ == "__main__":
    with runlog.one_line_errors():
        main(runlog.cli(Args, CONFIGS))
