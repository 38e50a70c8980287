"""Diffusion steering (DSRL): a frozen π₀ steered through the noise its denoising chain starts from, learned by SAC.

Method: Wagenmaker, Nakamoto, Zhang et al., "Steering Your Diffusion Policy with Latent Space Reinforcement Learning"
(2025), SAC (Haarnoja et al., 2018). π₀ maps an observation and a noise w ~ N(0, I) to a chunk; DSRL keeps π₀ fixed
and learns a noise policy π^W(w | o) that picks w, so the RL action is π₀'s initial noise for the executed chunk.
  - The noise policy: a tanh-Gaussian MLP on [stop_gradient(π₀ prefix features), state] -> w ∈ (−s, s)^{H×A_m}
    (--noise-scale s), π₀'s noise for the H executed steps of its chunk; the steps π₀ predicts and the env never
    executes start from 0. Acting: one prefix pass, w from π^W, π₀'s K Euler steps from w, the chunk's H steps run.
  - --critic noise (DSRL-SAC, the default, as dsrl_pi0's π₀ code): Q^W(o, w) learns the chunked n-step soft TD
    target on the executed noise w,
      y = Σ_{k<H} γ^k r_{t+k} + γ^n · mask · (Q̄^W(o_{t+H}, w′) − α log π^W(w′ | o_{t+H})),  w′ ~ π^W(o_{t+H}),
    n the valid steps, Q̄^W the target ensemble aggregated by --q-agg.
  - --critic aliased (DSRL-NA): Q^A(o, a) on executed chunks learns that target, and Q^W(o, w) learns Q^A(o, π₀(o, w))
    by regression on noise-chunk pairs that π₀ produced when the observation was acted on (or encoded, for the prior
    data): the executed pair and --alias-n − 1 more (--alias-from). Every noise that π₀ maps to the same chunk gets
    the same value (the aliasing), and any chunk with a return, prior data's included, trains Q^A. The backup reads
    Q^W at o_{t+H}, which equals Q^A(o_{t+H}, π₀(o_{t+H}, w′)) where the distillation holds, so no π₀ pass runs
    inside an update.
  - The actor maximises Q^W(o, w) − α log π^W(w | o) through w's reparameterisation; α tunes itself to an entropy of
    --target-entropy per noise dim (SAC). Critic values are in critic units (return − μ)/σ, μ, σ the prior data's.
  - π₀ comes from --pi0-checkpoint, or from --offline-steps of flow matching (BC) on the prior data first, with its
    weights averaged (θ̄ ← d·θ̄ + (1 − d)·θ, --ema-decay d); θ̄ is the π₀ that the noise policy steers, frozen.
  - Online, per env chunk step: one jitted acting call in every env, o_{t+H}'s view, then --utd updates of the
    critics, the actor and α in one jitted scan on cached arrays (the views and noise-chunk pairs stored when acting;
    --online-fraction of each batch from the buffer, the rest from the prior data where --critic aliased uses it).
Evaluations log the steered π₀ (w = s·tanh(mean)) and plain π₀ (w ~ N(0, I)), and Q^W's calibration.

  python dsrl_pi0.py                                     # push, CPU π₀ preset: BC, then DSRL online, < 10 min
  python dsrl_pi0.py --env libero                        # GPU: openpi's pi0_libero steered, π₀ frozen
"""

from __future__ import annotations

import dataclasses
import math
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
    # ---- env and cadence (steps: updates, offline and online)
    action_horizon: int = 5
    """H, the chunk length executed open loop"""
    num_envs: int = 64
    """parallel environments acting online"""
    eval_episodes: int = 100
    """episodes per evaluation (the same ones every time), for each evaluated policy"""
    eval_envs: int = 100
    """environments an evaluation plays its episodes on (at most --eval-episodes are used)"""
    log_every: int = 200
    """log metrics every this many updates (0: only at the end of each phase)"""
    eval_every: int = 0
    """evaluate every this many updates (0: only at the start and at the end of each phase)"""
    save_every: int = 2000
    """checkpoint every this many updates, and at the end of each phase and on SIGINT/SIGTERM (0: only then)"""

    # ---- model
    flow_steps: int = 5
    """π₀'s Euler steps, from the noise to the chunk (the map the noise policy steers)"""
    image_size: int = 0
    """camera image size (push: 0 = state only; libero: 0 = the dataset's)"""
    freeze_backbone: bool = False
    """BC trains only the action expert and the projections"""

    # ---- algorithm
    critic: Literal["noise", "aliased"] = "noise"
    """noise: DSRL-SAC, Q^W by TD on the executed noise; aliased: DSRL-NA, Q^A on chunks by TD and Q^W distilled
    from it (how the two compare: docs/results/dsrl.md)"""
    offline_steps: int = 10_000
    """BC (flow-matching) updates of π₀ on the prior data before going online (0 with --pi0-checkpoint)"""
    online_steps: int = 16_000
    """SAC updates in the online phase (each env chunk step is followed by --utd of them)"""
    batch_size: int = 64
    """chunk transitions per BC update"""
    updates_per_call: int = 20
    """BC updates per jitted call (lax.scan)"""
    lr: float = 1e-3
    """π₀'s BC learning rate"""
    ema_decay: float = 0.999
    """d of θ̄ ← d·θ̄ + (1 − d)·θ, the average of π₀'s weights over BC that is steered online (0: off, θ)"""
    gamma: float = 0.95
    """per-step discount"""
    noise_scale: float = 1.5
    """s: the noise policy's w lies in (−s, s) per dim (π₀ was trained from N(0, I))"""
    alias_n: int = 4
    """--critic aliased: noise-chunk pairs per observation that Q^W learns Q^A on (the executed one and N(0, I) ones)"""
    alias_from: Literal["policy", "prior"] = "policy"
    """--critic aliased: where the pairs' other noises come from when acting: π^W(· | o), where the actor queries Q^W,
    or N(0, I), π₀'s prior (the prior data's pairs: always N(0, I))"""
    num_qs: int = 2
    """ensemble size of each critic"""
    q_agg: Literal["min2", "mean"] = "min2"
    """how the backup and the actor aggregate Q^W's ensemble: min of a random pair (SAC, RLPD) or mean"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths (Q^A and Q^W)"""
    actor_hidden: tuple[int, ...] = (256, 256)
    """noise policy MLP widths"""
    critic_lr: float = 3e-4
    """learning rate of both critics"""
    actor_lr: float = 3e-4
    """noise policy learning rate"""
    temp_lr: float = 3e-4
    """learning rate of log α"""
    init_temp: float = 0.01
    """α at the start: the entropy bonus adds about α·|log π^W|/(1 − γ^H) to Q, in critic units where returns have
    std 1; 0.1 makes it ~5 on push (10 noise dims) and drowns the reward until α has fallen"""
    target_entropy: float = -0.5
    """SAC's entropy target, per noise dim (−0.5: jaxrl2's −dim/2)"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    utd: int = 16
    """online updates per env chunk step, run in one jitted scan"""
    learning_starts: int = 2000
    """online chunks collected before the first update"""
    online_batch_size: int = 256
    """transitions per online update (cached arrays: cheap)"""
    online_fraction: float = 1.0
    """share of online transitions in each online batch; the rest from the prior data (--critic aliased only)"""
    buffer_size: int = 200_000
    """replay buffer capacity in chunks (critic views, chunks and noises: ~20 kB a chunk for π₀)"""


# The flags that depend on the env, per env (--env picks one; "gym": any other gymnasium id). push's are the defaults
# above; libero's fit 16 cores and 128 GB.
CONFIGS = {
    "push": Args(
        env="push",
        action_horizon=5,
        num_envs=64,
        eval_episodes=100,
        eval_envs=100,
        pi0_preset="cpu",
        offline_steps=10_000,
        gamma=0.95,
        utd=16,
        learning_starts=2000,
    ),
    "libero": Args(
        env="libero",
        action_horizon=10,
        num_envs=16,
        eval_episodes=50,
        eval_envs=16,
        pi0_preset="pi0",
        lr=2.5e-5,
        offline_steps=0,
        gamma=0.99,
        noise_scale=1.0,
        utd=20,
        learning_starts=500,
    ),
    "gym": Args(
        env="gym",
        action_horizon=5,
        num_envs=16,
        eval_episodes=100,
        eval_envs=16,
        pi0_preset="cpu",
        lr=3e-4,
        gamma=0.99,
        utd=8,
        learning_starts=2000,
    ),
}


def check(args: Args) -> Args:
    """The run's flags (a resumed run's own), LIBERO's inputs found in the caches; inconsistent flags refused."""
    args = runlog.prepared(args, "dsrl_pi0", CONFIGS, data_with_checkpoint="optional")
    if args.pi0_checkpoint and args.dataset is None and args.offline_steps > 0:  # no prior data: online from π₀
        if args.offline_steps != runlog.configured(CONFIGS, args.env).offline_steps:  # given on the command line
            raise RunError(
                f"--offline-steps {args.offline_steps} needs prior data: pass --dataset, or leave the flag out to "
                "run online only from --pi0-checkpoint"
            )
        print("--pi0-checkpoint without --dataset: no prior data, so no BC phase (--offline-steps 0)")
        args = dataclasses.replace(args, offline_steps=0)
    runlog.check_at_least(args, 1, "updates_per_call", "batch_size", "online_batch_size", "utd", "num_envs")
    runlog.check_at_least(args, 1, "num_qs", "action_horizon", "flow_steps", "alias_n")
    runlog.check_at_least(args, 1, "eval_episodes", "eval_envs", "buffer_size")
    runlog.check_at_least(args, 0, "image_size", "offline_steps", "online_steps", "learning_starts")
    runlog.check_at_least(args, 0, "log_every", "eval_every", "save_every")
    for flag in ("critic_hidden", "actor_hidden"):
        widths = getattr(args, flag)
        if not widths or min(widths) < 1:
            name = "--" + flag.replace("_", "-")
            raise RunError(f"{name} {' '.join(map(str, widths))}: one width ≥ 1 per hidden layer")
    runlog.check_ranges(args, gamma=(0, 1), tau=(0, 1), lr=(0, None), critic_lr=(0, None), actor_lr=(0, None))
    runlog.check_ranges(args, temp_lr=(0, None), max_grad_norm=(0, None))
    if args.q_agg == "min2" and args.num_qs < 2:
        raise RunError("--q-agg min2 needs --num-qs >= 2")
    if args.learning_starts > args.buffer_size:
        raise RunError(f"--learning-starts {args.learning_starts} > --buffer-size {args.buffer_size}: never updates")
    if not 0 <= args.ema_decay < 1:
        raise RunError(f"--ema-decay must be in [0, 1): 0 turns the average off (got {args.ema_decay})")
    if not 0 <= args.online_fraction <= 1:
        raise RunError(f"--online-fraction must be in [0, 1] (got {args.online_fraction})")
    if args.critic == "noise" and args.online_fraction < 1:
        raise RunError("--critic noise learns only from executed noises: prior data has none (--online-fraction 1)")
    if not (args.noise_scale > 0 and args.init_temp > 0):
        raise RunError(f"--noise-scale and --init-temp must be > 0 (got {args.noise_scale}, {args.init_temp})")
    return args


# ----------------------------------------------------------------------------------------------------- networks
class Critic(nn.Module):
    """One ensemble member Q(o, x), x a chunk (Q^A) or a noise (Q^W): Dense → LayerNorm → GELU blocks, a scalar."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # [..., W+S+D] -> [...]
        for width in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(width)(x)))
        return nn.Dense(1)(x)[..., 0]


class NoisePolicy(nn.Module):
    """π^W(w | o): Dense → LayerNorm → GELU blocks, then the mean and log std of a Gaussian over D noise dims."""

    hidden: tuple[int, ...]
    dims: int

    @nn.compact
    def __call__(self, z):  # [B,W+S] -> mean [B,D], log std [B,D]
        for width in self.hidden:
            z = nn.gelu(nn.LayerNorm()(nn.Dense(width)(z)))
        mean = nn.Dense(self.dims)(z)
        log_std = nn.Dense(self.dims)(z)
        return mean, jnp.clip(log_std, -5.0, 2.0)


@dataclass(frozen=True)
class Nets:
    """π₀, the env ↔ π₀ plumbing, the critics and the noise policy: what the losses and acting close over."""

    pi: pi0.Pi0
    io: pi0.EnvIO
    critic: Critic
    actor: NoisePolicy
    ret: tuple[float, float] = (0.0, 1.0)  # (μ, σ): Q in critic units (return − μ) / σ, see `return_units`


def return_units(offline: data.ChunkDataset | None) -> tuple[float, float]:
    """(μ, σ), the mean and std of the prior data's Monte Carlo returns from o_t: the critics learn in critic units
    (return − μ) / σ, so that the learning rates and α hold at any reward scale. (0, 1) without prior data."""
    if offline is None or len(offline) == 0:
        return 0.0, 1.0
    mu = float(offline.return_to_go.mean())
    sigma = float(offline.return_to_go.std())
    return mu, sigma if sigma > 0 else 1.0


def critic_obs(prefix: pi0.Prefix) -> jax.Array:
    """The critics' and the noise policy's view of observations [B,W+S]: π₀'s pooled prefix features (constants) and
    normalised states."""
    return jnp.concatenate([jax.lax.stop_gradient(prefix.features), prefix.state], -1)


def q_values(nets: Nets, cparams, obs_z, x):
    """Ensemble values of N inputs per observation, chunks [B,N,H,A] or noises [B,N,H,A_m], at views [B,W+S] ->
    [E,B,N]."""
    B, N = x.shape[:2]
    z = jnp.broadcast_to(obs_z[:, None], (B, N, obs_z.shape[-1]))
    inp = jnp.concatenate([z, x.reshape(B, N, -1)], -1)
    return jax.vmap(nets.critic.apply, in_axes=(0, None))({"params": cparams}, inp)  # members vmapped


def aggregate(q, rng, how: str):
    """An ensemble's values [E,...] -> [...]: the min of a random pair (min2) or the mean."""
    if how == "min2":
        pair = jax.random.choice(rng, q.shape[0], (2,), replace=False)
        return q[pair].min(0)
    return q.mean(0)


def noise_shape(nets: Nets) -> tuple[int, int]:
    """The noise policy's w per observation: π₀'s noise for the H executed steps, all A_m of its action dims."""
    return nets.io.horizon, nets.pi.config.action_dim


def squash(mean, log_std, eps, scale: float):
    """The tanh-Gaussian's sample and log-density: u = mean + std·ε, w = s·tanh(u) -> w [B,D], log π(w) [B], the
    change of variables |dw/du| = s·(1 − tanh²u) per dim included."""
    u = mean + jnp.exp(log_std) * eps
    log_n = -0.5 * jnp.square(eps) - log_std - 0.5 * math.log(2 * math.pi)  # log N(u; mean, std²)
    log_det = math.log(scale) + 2 * (math.log(2) - u - jax.nn.softplus(-2 * u))  # log s(1 − tanh²u), stable
    return scale * jnp.tanh(u), (log_n - log_det).sum(-1)


def sample_noise(nets: Nets, aparams, obs_z, rng, scale: float):
    """w ~ π^W(· | o) by reparameterisation -> w [B,H,A_m] in (−s, s), log π^W(w | o) [B]."""
    mean, log_std = nets.actor.apply({"params": aparams}, obs_z)  # [B,D]
    w, logp = squash(mean, log_std, jax.random.normal(rng, mean.shape), scale)
    return w.reshape(-1, *noise_shape(nets)), logp


def mean_noise(nets: Nets, aparams, obs_z, scale: float):
    """The noise policy's deterministic choice (evaluations): w = s·tanh(mean) -> [B,H,A_m]."""
    mean, _ = nets.actor.apply({"params": aparams}, obs_z)
    return (scale * jnp.tanh(mean)).reshape(-1, *noise_shape(nets))


def full_noise(nets: Nets, w):
    """The noise of π₀'s whole chunk from the executed steps' w [...,H,A_m]: 0 on the H_m − H steps never executed."""
    pad = nets.pi.config.action_horizon - w.shape[-2]
    return jnp.pad(w, [(0, 0)] * (w.ndim - 2) + [(0, pad), (0, 0)])


def steered(nets: Nets, params, prefix, w, steps: int):
    """π₀'s chunks from the noises w [B,N,H,A_m] (its executed steps' noise) -> [B,N,H_m,A_m], one prefix."""
    return nets.pi.sample(params, prefix, full_noise(nets, w), steps)


def encode(nets: Nets, args: Args, params, obs, rng, views_only: bool = False):
    """What the critics need of observations: views [B,W+S], and (unless `views_only`) --alias-n noise-chunk pairs
    from w ~ N(0, I): noises [B,M,H,A_m], executed chunks [B,M,H,A]."""
    prefix = nets.pi.prefix(params, nets.io.observe(obs))
    if views_only:
        return jax.lax.stop_gradient(critic_obs(prefix))
    w = jax.random.normal(rng, (prefix.mask.shape[0], args.alias_n, *noise_shape(nets)))
    chunks = nets.io.executed(steered(nets, params, prefix, w, args.flow_steps))
    return jax.lax.stop_gradient((critic_obs(prefix), w, chunks))


# ----------------------------------------------------------------------------------------------------- losses
TD_KEYS = ("discounted_return", "n_valid", "mask")  # what the TD target reads of a chunk transition
BC_KEYS = ("obs", "actions", "valid")  # what the BC term reads
SHOW = ("losses/bc", "losses/critic", "losses/noise_critic", "charts/alpha", "charts/q_data")  # progress lines


def bc_loss(params, batch, rng, nets: Nets, args: Args):
    """Flow matching on data chunks, padded steps past an episode's end not imitated -> (loss, info)."""
    prefix = nets.pi.prefix(params, nets.io.observe(batch["obs"]))
    prefix = jax.lax.stop_gradient(prefix) if args.freeze_backbone else prefix
    actions = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m], relative where π₀ is
    w = batch["valid"].astype(jnp.float32)  # [B,H]
    per_step = nets.pi.flow_loss(params, prefix, actions, rng)  # [B,H_m]
    loss = (per_step * nets.io.step_weights(w)).sum() / jnp.maximum(w.sum(), 1.0)
    return loss, {"losses/bc": loss}


def td_target(train, target, batch, rng, nets: Nets, args: Args):
    """y = R + γ^{n_valid}·mask·(Q̄^W(o_{t+H}, w′) − α log π^W(w′ | o_{t+H})), w′ ~ π^W, Q̄^W the target noise
    critic aggregated by --q-agg; in critic units, a constant (stop_gradient) -> y [B], info."""
    k_w, k_pair = jax.random.split(rng)
    frozen = jax.lax.stop_gradient(train)
    w_next, logp_next = sample_noise(nets, frozen["actor"], batch["next_obs_z"], k_w, args.noise_scale)
    q_next = q_values(nets, target["noise_critic"], batch["next_obs_z"], w_next[:, None])[:, :, 0]  # [E,B]
    v_next = aggregate(q_next, k_pair, args.q_agg) - jnp.exp(frozen["log_alpha"]) * logp_next  # critic units
    mu, sigma = nets.ret  # the bootstrap back in reward units, the target in critic units
    discount = args.gamma ** batch["n_valid"].astype(jnp.float32)  # the bootstrap is n_valid steps away
    y = (batch["discounted_return"] + discount * batch["mask"] * (mu + sigma * v_next) - mu) / sigma
    return jax.lax.stop_gradient(y), {"charts/q_target": mu + sigma * y.mean()}  # charts: reward units


def critic_loss(train, batch, y, nets: Nets, args: Args):
    """aliased: Q^A regresses y on the executed chunk, and Q^W regresses Q^A's ensemble mean (a constant) on the
    noise-chunk pairs; noise: Q^W regresses y on the executed noise -> (loss, info)."""
    if args.critic == "noise":
        q_w = q_values(nets, train["noise_critic"], batch["obs_z"], batch["noise"][:, None])[:, :, 0]  # [E,B]
        loss = jnp.mean(jnp.square(q_w - y[None]))
        return loss, {"losses/noise_critic": loss, "charts/q_data": nets.ret[0] + nets.ret[1] * q_w.mean()}
    q_a = q_values(nets, train["critic"], batch["obs_z"], batch["chunk"][:, None])[:, :, 0]  # [E,B]
    td = jnp.mean(jnp.square(q_a - y[None]))
    teacher = q_values(nets, jax.lax.stop_gradient(train["critic"]), batch["obs_z"], batch["alias_chunk"]).mean(0)
    q_w = q_values(nets, train["noise_critic"], batch["obs_z"], batch["alias_noise"])  # [E,B,M]
    distill = jnp.mean(jnp.square(q_w - jax.lax.stop_gradient(teacher)[None]))  # Q^W(o, w) ≈ Q^A(o, π₀(o, w))
    info = {"losses/critic": td, "losses/noise_critic": distill}
    info["charts/q_data"] = nets.ret[0] + nets.ret[1] * q_a.mean()
    return td + distill, info


def actor_loss(train, batch, rng, nets: Nets, args: Args):
    """SAC's actor: E[α log π^W(w | o) − Q^W(o, w)], w ~ π^W(o) reparameterised; Q^W and α are constants. And α's
    loss, −log α·(log π^W + target entropy), that raises α while the entropy is below its target -> (loss, info)."""
    k_w, k_pair = jax.random.split(rng)
    w, logp = sample_noise(nets, train["actor"], batch["obs_z"], k_w, args.noise_scale)
    q = q_values(nets, jax.lax.stop_gradient(train["noise_critic"]), batch["obs_z"], w[:, None])[:, :, 0]  # [E,B]
    alpha = jnp.exp(jax.lax.stop_gradient(train["log_alpha"]))
    loss = jnp.mean(alpha * logp - aggregate(q, k_pair, args.q_agg))
    target = args.target_entropy * math.prod(noise_shape(nets))
    temp_loss = -train["log_alpha"] * jnp.mean(jax.lax.stop_gradient(logp) + target)
    info = {"losses/actor": loss, "losses/alpha": temp_loss, "charts/alpha": alpha, "charts/entropy": -logp.mean()}
    return loss + temp_loss, info


def total_loss(train, batch, rng, target, nets: Nets, args: Args):
    """One SAC update's loss: the critics' (TD, and the distillation for aliased), the actor's and α's."""
    k_target, k_actor = jax.random.split(rng)
    y, info = td_target(train, target, batch, k_target, nets, args)
    c_loss, info_c = critic_loss(train, batch, y, nets, args)
    a_loss, info_a = actor_loss(train, batch, k_actor, nets, args)
    return c_loss + a_loss, {**info, **info_c, **info_a}


# ----------------------------------------------------------------------------------------------------- update
def trained_part(nets: Nets, args: Args, params):
    """π₀'s weights that BC trains (all of them, or the action expert and projections with --freeze-backbone): what
    θ̄ averages."""
    return pi0.trained_part(params, nets.pi.optimizer_labels(params, "train", args.freeze_backbone))


def acting_params(state):
    """π₀'s weights that the noise policy steers (acting, evaluations, the critics' pairs, export): θ with θ̄ in
    place when kept; frozen online."""
    return pi0.overlaid(state["params"], state["ema"]) if state["ema"] else state["params"]


SAC_KEYS = ("critic", "noise_critic", "actor", "log_alpha")  # what the online update trains


def make_optimizers(args: Args, nets: Nets, params):
    """π₀'s BC: clipped Adam (under --freeze-backbone the VLM's parameters get zero updates); the SAC parts: Adam."""
    tx = {"train": optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.lr))}
    labels = nets.pi.optimizer_labels(params, "train", args.freeze_backbone)
    bc_tx = optax.multi_transform({**tx, "frozen": optax.set_to_zero()}, labels)
    lrs = {"critic": args.critic_lr, "noise_critic": args.critic_lr, "actor": args.actor_lr, "log_alpha": args.temp_lr}
    return bc_tx, {k: optax.adam(lr) for k, lr in lrs.items()}


def make_update(nets: Nets, args: Args, bc_tx, sac_tx):
    """BC of π₀ and the online SAC update: (state, batches [U,B,...], rng) -> (state, info)."""

    def bc(state, batch, rng):
        (_, info), g = jax.value_and_grad(bc_loss, has_aux=True)(state["params"], batch, rng, nets, args)
        updates, opt = bc_tx.update(g, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {**state, "params": params, "opt": opt}
        if state["ema"]:  # θ̄ ← d·θ̄ + (1 − d)·θ
            new["ema"] = optax.incremental_update(trained_part(nets, args, params), state["ema"], 1 - args.ema_decay)
        return new, info

    def sac(state, batch, rng):  # batch: cached views, chunks, noises (`encode`, acting), no π₀ pass
        train = {k: state[k] for k in SAC_KEYS}
        target = {"critic": state["target_critic"], "noise_critic": state["target_noise_critic"]}
        (_, info), g = jax.value_and_grad(total_loss, has_aux=True)(train, batch, rng, target, nets, args)
        new = dict(state)
        for k in SAC_KEYS:
            updates, new[f"{k}_opt"] = sac_tx[k].update(g[k], state[f"{k}_opt"], state[k])
            new[k] = optax.apply_updates(state[k], updates)
        for k in ("critic", "noise_critic"):
            new[f"target_{k}"] = optax.incremental_update(new[k], state[f"target_{k}"], args.tau)
        return new, info

    return mesh.scan_updates(bc), mesh.scan_updates(sac)


def online_batches(nets: Nets, args: Args, params, offline, buffer, run: runlog.Run, rng, bs=1024):
    """The online batch sampler, (np_rng, n) -> a batch of cached arrays: --online-fraction of the rows from the
    replay buffer (all of them while there is no prior data or --critic noise), the rest from the prior data (first
    in the batch). The prior data's arrays are computed here once, valid while π₀ is frozen: the views of every
    frame, the data chunks as Q^A reads them, and --alias-n noise-chunk pairs per frame (kept in the run folder so
    that a resumed run distils on the same pairs)."""

    def buffer_rows(j):
        rows = {k: getattr(buffer, k)[j] for k in TD_KEYS}
        return {**rows, **{k: v[j] for k, v in buffer.extras.items()}}

    if offline is None or args.online_fraction >= 1:  # every row from the buffer
        return lambda np_rng, n: buffer_rows(np_rng.integers(0, len(buffer), n))
    episodes = offline.data
    enc = jax.jit(partial(encode, nets, args), static_argnames="views_only")
    kept = run.kept("alias_cache")  # a resumed run reads the pairs back: it encodes the views alone

    def encode_rows(i):
        return enc(params, data.gather_obs(episodes.obs, i), jax.random.fold_in(rng, i[0]), bool(kept))

    out = mesh.map_batches(encode_rows, len(episodes), bs)  # every frame once
    if kept:
        obs_z, pairs = out, kept
    else:
        obs_z, noise, chunks = out
        pairs = run.keep("alias_cache", {"alias_noise": noise, "alias_chunk": chunks})
    to_model = jax.jit(lambda a, s: nets.io.executed(nets.io.to_model(a, s)))

    def chunk_rows(i):
        return to_model(episodes.actions[offline.action_idx[i]], episodes.obs["state"][offline.obs_idx[i]])

    chunk = mesh.map_batches(chunk_rows, len(offline), bs)  # [C,H,A]: the data chunks as Q^A reads them

    def sample(np_rng, n):
        n_online = int(round(n * args.online_fraction)) if len(buffer) else 0
        i = np_rng.integers(0, len(offline), n - n_online)  # prior-data chunks
        j = np_rng.integers(0, len(buffer) or 1, n_online)  # buffer rows
        o = offline.obs_idx[i]
        rows = {k: getattr(offline, k)[i] for k in TD_KEYS}
        rows.update(chunk=chunk[i], obs_z=obs_z[o], next_obs_z=obs_z[offline.next_obs_idx[i]])
        rows.update(alias_noise=pairs["alias_noise"][o], alias_chunk=pairs["alias_chunk"][o])
        if n_online == 0:
            return rows
        online = buffer_rows(j)
        return {k: np.concatenate([v, online[k]]) for k, v in rows.items() if k in online}

    return sample


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(nets: Nets, args: Args):
    """`act`: (state, obs, rng, how) -> env-unit chunk [B,H,A], Q^W [B] (reward units), and the buffer's cache: view
    [B,W+S], executed chunk [B,H,A], noise [B,H,A_m] and, for aliased, --alias-n noise-chunk pairs whose first is the
    executed one. how: "sample" (online, w ~ π^W), "mean" (the steered evaluation), "plain" (w ~ N(0, I): π₀ alone)."""

    @partial(jax.jit, static_argnames="how")
    def act(state, obs, rng, how: str):
        k_w, k_alias = jax.random.split(rng)
        params = acting_params(state)  # θ̄, frozen
        prefix = nets.pi.prefix(params, nets.io.observe(obs))  # the one VLM pass
        obs_z = critic_obs(prefix)
        B = obs_z.shape[0]
        if how == "sample":
            w = sample_noise(nets, state["actor"], obs_z, k_w, args.noise_scale)[0]
        elif how == "mean":
            w = mean_noise(nets, state["actor"], obs_z, args.noise_scale)
        else:
            w = jax.random.normal(k_w, (B, *noise_shape(nets)))
        w = w[:, None]  # [B,1,H,A_m]
        if how == "sample" and args.critic == "aliased":  # the executed noise first, then --alias-from ones
            M = args.alias_n - 1
            if args.alias_from == "policy":
                z_rep = jnp.repeat(obs_z, M, axis=0)  # [B·M,W+S]
                extra = sample_noise(nets, state["actor"], z_rep, k_alias, args.noise_scale)[0]
                extra = extra.reshape(B, M, *noise_shape(nets))
            else:
                extra = jax.random.normal(k_alias, (B, M, *noise_shape(nets)))
            w = jnp.concatenate([w, extra], 1)  # [B,M+1,H,A_m]
        chunks = steered(nets, params, prefix, w, args.flow_steps)  # [B,M,H_m,A_m]
        q = q_values(nets, state["noise_critic"], obs_z, w[:, :1])[:, :, 0].mean(0)  # [B]
        q = nets.ret[0] + nets.ret[1] * q  # reward units (the evaluations' calibration)
        chunk = chunks[:, 0]
        cache = {"obs_z": obs_z, "chunk": nets.io.executed(chunk), "noise": w[:, 0]}
        if how == "sample" and args.critic == "aliased":
            cache.update(alias_noise=w, alias_chunk=nets.io.executed(chunks))
        return nets.io.to_env(chunk, obs["state"]), q, jax.lax.stop_gradient(cache)

    return act


def evaluate(act, state, args: Args, spec: envs.EnvSpec, rng, label: str, run: runlog.Run, step: int) -> dict:
    """The steered π₀ (w = s·tanh(mean)) and plain π₀ (w ~ N(0, I)), each on the same --eval-episodes episodes
    every time (one `rng`): success, return and Q^W's calibration; printed. --capture-video: the first
    --video-episodes episodes of each written as videos (`run.log_videos`)."""
    where = dict(episodes=args.eval_episodes, num_envs=args.eval_envs, seed=args.seed + 10_000)
    where.update(horizon=args.action_horizon, gamma=args.gamma, record=args.recorded_episodes)

    def policy(how):  # (obs, key) -> (chunk, its Q^W)
        return lambda obs, key: act(state, obs, key, how)[:2]

    policies = {"": ("steered π₀", "mean"), "plain_": ("plain π₀", "plain")}
    out, shown = {}, []
    for prefix, (name, how) in policies.items():
        metrics, trace = envs.evaluate(spec, policy(how), rng, prefix=prefix, **where)
        run.log_videos(step, "steered" if how == "mean" else "plain", trace.videos)
        metrics.update(envs.calibration(trace, args.gamma, prefix))
        out.update(metrics)
        q = f"Q pred {metrics[f'eval/{prefix}q_pred']:.3f} vs realised {metrics[f'eval/{prefix}q_realised']:.3f}"
        shown.append(f"{name} {metrics[f'eval/{prefix}success_rate']:.1%} ({q})")
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
    envs.check_horizon(env, args.action_horizon, args.env)
    path = args.dataset
    if path is None and args.pi0_checkpoint is None:  # push: the demonstrator's data, generated on first use
        path = envs.default_dataset("push", image_size=args.image_size)
    episodes, offline, stats, prompts = None, None, None, env.prompts  # no prior data: online only, from π₀
    if path is not None:
        episodes = data.load_dataset(path, env, spec.image_size)
        offline = data.make_chunks(episodes, args.action_horizon, args.gamma)
        envs.check_batch(offline, args.batch_size, "--batch-size")
        stats, prompts = data.norm_stats(episodes), episodes.prompts
    policy = runlog.make_policy(env, prompts, stats, k_pi, action_horizon=args.action_horizon, **args.pi0_flags())
    cfg = policy.model.config
    dims = args.action_horizon * cfg.action_dim  # D, the noise policy's action: π₀'s noise for the executed steps
    actor = NoisePolicy(tuple(args.actor_hidden), dims)
    nets = Nets(policy.model, policy.io, Critic(tuple(args.critic_hidden)), actor, return_units(offline))
    obs_dim = cfg.vlm.width + (cfg.state_dim or cfg.action_dim)
    k_qa, k_qw, k_actor = jax.random.split(k_critic, 3)
    init_q = lambda k, d: jax.jit(jax.vmap(lambda k: nets.critic.init(k, jnp.zeros((1, obs_dim + d)))["params"]))(
        jax.random.split(k, args.num_qs)
    )
    sac = {"noise_critic": init_q(k_qw, dims), "actor": actor.init(k_actor, jnp.zeros((1, obs_dim)))["params"]}
    sac["critic"] = init_q(k_qa, args.action_horizon * env.action_dim) if args.critic == "aliased" else {}
    sac["log_alpha"] = jnp.log(jnp.float32(args.init_temp))
    bc_tx, sac_tx = make_optimizers(args, nets, policy.params)
    state = {"params": policy.params, "opt": bc_tx.init(policy.params) if args.offline_steps else {}, **sac}
    state.update({f"{k}_opt": sac_tx[k].init(sac[k]) for k in SAC_KEYS})
    state.update(target_critic=jax.tree.map(jnp.copy, sac["critic"]))
    state.update(target_noise_critic=jax.tree.map(jnp.copy, sac["noise_critic"]))
    averaged = args.ema_decay > 0 and args.offline_steps > 0  # θ̄ only where π₀ trains
    state["ema"] = jax.tree.map(jnp.copy, trained_part(nets, args, policy.params)) if averaged else {}
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))
    n_pi = pi0.param_count(state["params"]) / 1e6
    n_sac = pi0.param_count({k: state[k] for k in ("critic", "noise_critic", "actor")}) / 1e3
    what = f"noise policy and critics {n_sac:.0f}k ({dims} noise dims, --critic {args.critic})"
    print(f"π₀ {n_pi:.2f}M params, {what}, {len(offline or ())} chunks from {path}")
    run = runlog.Run(args, "dsrl_pi0")
    buffer = data.ReplayBuffer(args.buffer_size, args.action_horizon, args.gamma)  # TD arrays + the acting cache

    # ---- restore: the train state, and on the host the buffer, the envs and the online episodes' successes
    step, obs, ep_success = 0, env.reset(seed=args.seed)[0], []  # ep_success: the online episodes' last 100
    restored = run.restore(state)
    if restored is not None:
        step, state, _, host = restored
        buffer.load_state_dict(host["buffer"])
        obs = envs.resume_loop(env, host["loop"], args.seed + step)
        ep_success = list(host["ep_success"])

    def save(step):  # a repeated step (warm-up: no updates) rewrites the host part only
        host = {"buffer": buffer.state_dict(), "loop": envs.loop_state(env, obs), "ep_success": ep_success}
        run.save(step, state, {"step": step, **policy.record()}, host)

    # ---- loop: BC of π₀ on the prior data, then online: act with the noise policy, cache, --utd SAC updates
    bc_update, sac_update = make_update(nets, args, bc_tx, sac_tx)
    act = mesh.host_local(make_act(nets, args), dev_mesh)  # each process acts on its own envs
    encode_next = mesh.host_local(jax.jit(partial(encode, nets, args, views_only=True)), dev_mesh)
    total = args.offline_steps + args.online_steps
    results, info = {}, {}
    if step == 0 and run.saved_step is None:  # π₀ (and the untrained noise policy) before any update
        m = evaluate(act, state, args, spec, k_eval, "start, update 0", run, 0)
        run.log(0, m)
        results.update({f"start/{k}": v for k, v in m.items()})
    for phase, end in (("offline", args.offline_steps), ("online", total)):
        t_phase, s_phase = time.time(), step
        warm = 10 * len(buffer) // max(args.learning_starts, 1)  # tenths of the warm-up reported so far
        if phase == "online" and step < end:  # π₀ is frozen from here: encode the prior data once
            sample_online = online_batches(nets, args, acting_params(state), offline, buffer, run, k_cache)
        while step < end:
            key = jax.random.fold_in(jax.random.fold_in(k_run, step), len(buffer))  # warm-up steps add no updates
            k_act, k_update, k_next = jax.random.split(key, 3)
            np_rng = np.random.default_rng([args.seed, step])  # the data order, a function of the step (resume)
            if phase == "offline":
                n = min(args.updates_per_call, end - step)
                bs = [offline.sample(np_rng, args.batch_size, BC_KEYS) for _ in range(n)]
                state, info = bc_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
            else:  # one chunk in every env from the noise policy, cache what the updates read, --utd SAC updates
                chunk, _, cache = act(state, obs, k_act, "sample")
                next_obs, cs = envs.execute_chunk(env, obs, np.asarray(chunk), args.gamma)
                next_z = encode_next(acting_params(state), cs.final_obs, k_next)  # o_{t+H}, before a reset
                cs, extras = mesh.all_rows(jax.device_get((cs, {**cache, "next_obs_z": next_z})))  # every process's
                buffer.add(cs, extras)
                ep_success = (ep_success + cs.success[cs.terminated | cs.truncated].tolist())[-100:]
                obs = next_obs
                n = 0  # updates after this chunk: none while the buffer warms up
                if len(buffer) >= args.learning_starts:
                    n = min(args.utd, end - step)
                    bs = [sample_online(np_rng, args.online_batch_size) for _ in range(n)]
                    state, info = sac_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
                elif 10 * len(buffer) // args.learning_starts > warm:  # warm-up: a progress line, the buffer saved
                    kb = buffer.bytes_per_transition() / 1e3
                    print(f"[online] {len(buffer)}/{args.learning_starts} chunks ({kb:.1f} kB each) before updates")
                    save(step)
                    warm = 10 * len(buffer) // args.learning_starts
            prev, step = step, step + n
            # ---- log
            if runlog.crossed(prev, step, args.log_every) or (n and step == end):
                m = dict(info)
                if ep_success:
                    m["charts/online_success_rate"] = np.mean(ep_success)
                run.report(step, m, phase, total, (s_phase, t_phase), SHOW)
            # ---- evaluate
            if runlog.crossed(prev, step, args.eval_every) and step != end:
                run.log(step, evaluate(act, state, args, spec, k_eval, f"eval {step}", run, step))
            # ---- save (SIGINT / SIGTERM: save here and exit)
            if (runlog.crossed(prev, step, args.save_every) or run.stopping) and step != end:
                save(step)
        if step > s_phase:  # the phase ran: evaluate and save its end
            rate = (step - s_phase) / max(time.time() - t_phase, 1e-9)
            label = f"{phase} done, update {step}, {rate:.1f} updates/s"
            m = evaluate(act, state, args, spec, k_eval, label, run, step)
            m[f"time/{phase}_updates_per_s"] = rate
            run.log(step, m)
            results.update({f"{p}/{k}": v for p in (phase, "final") for k, v in m.items()})
            save(step)
    env.close()
    spec.close()  # the evaluation envs it kept
    run.close()
    results.update({k: float(v) for k, v in jax.device_get(info).items()}, step=step, run_dir=run.dir)
    return results


if __name__ == "__main__":
    with runlog.one_line_errors():
        main(runlog.cli(Args, CONFIGS))
