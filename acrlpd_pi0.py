"""Offline-to-online Q-chunking with prior data (RLPD on action chunks), π₀ as the policy and trained online.

Method: Li, Zhou and Levine, "Reinforcement Learning with Action Chunking" (2025) on top of RLPD (Ball et al., 2023).
  - A critic ensemble (--num-qs LayerNorm MLPs) reads [stop_gradient(π₀ prefix features), state, H×A chunk] and
    learns the chunked n-step TD target   y = Σ_{k<H} γ^k r_{t+k} + γ^n · mask · Q̄(o_{t+H}, a′)   (n valid steps),
    a′ = the best of --target-n π₀ chunks at o_{t+H} by the online critic, Q̄ = the target ensemble's mean (--q-agg),
    in critic units (return − μ)/σ, μ and σ the prior data's returns' mean and std: weights hold at any reward scale.
  - Acting: --bon N chunks from one prefix pass, the best by the ensemble's mean − β·std (--act-pessimism), executed
    open loop (online: or drawn among the --topk best). --bon 1 is plain π₀.
  - Offline: one jitted update of π₀'s flow matching (BC) and the critic, with Cal-QL's conservative term.
  - Online, the VLM is frozen, so the critic's views cached when acting stay valid: --utd critic updates per env
    chunk step run on cached arrays (50/50 prior/online), and π₀'s action expert learns inside the acting call, from
    its prefix pass: flow matching on the chunks best-of-N chose (--distill-weight), −Q through the Euler steps
    (--actor-weight), BC on prior data as the anchor.
  - π₀'s action expert and projections act as θ̄, the average of their weights over the updates (θ̄ ← d·θ̄ + (1 − d)·θ,
    --ema-decay d; openpi's EMA): best-of-N, evaluations, the π₀ chunks in the critic's targets and the export; the
    gradients act on θ. The VLM is not averaged: the critic reads its features, from the one VLM pass that BC trains.
Evaluations log best-of-N and plain π₀ and the critic's calibration (eval/*q_pred vs eval/*q_realised).

  python acrlpd_pi0.py                                   # push, CPU π₀ preset, offline then online, < 10 min
  python acrlpd_pi0.py --env libero --bon 32          # GPUs: openpi's pi0_libero and LIBERO data from their caches
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
    """Euler steps when acting"""
    image_size: int = 0
    """camera image size (push: 0 = state only; libero: 0 = the dataset's)"""
    freeze_backbone: bool = False
    """train only the action expert, the projections and the critic"""

    # ---- algorithm
    offline_steps: int = 6000
    """updates on the prior data before going online"""
    online_steps: int = 16000
    """critic updates in the online phase (each env chunk step is followed by --utd of them)"""
    batch_size: int = 64
    """chunk transitions per offline update"""
    updates_per_call: int = 20
    """offline updates per jitted call (lax.scan)"""
    lr: float = 1e-3
    """π₀ learning rate"""
    ema_decay: float = 0.99
    """d of θ̄ ← d·θ̄ + (1 − d)·θ, the average of π₀'s action expert and projections that acts (0: off, θ acts); 0.99
    averages over ~100 updates, a tenth of the 1,000 π₀ updates of push's online phase"""
    gamma: float = 0.95
    """per-step discount"""
    bc_weight: float = 1.0
    """weight of the flow-matching (BC) loss"""
    num_qs: int = 2
    """critic ensemble size"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    q_agg: Literal["mean", "min2"] = "mean"
    """target ensemble aggregation: mean (Q-chunking) or min2 (min of a random pair, RLPD)"""
    target_n: int = 1
    """π₀ chunks sampled at o_{t+H} for the expected-max backup (1: back up π₀'s own chunk)"""
    target_flow_steps: int = 5
    """Euler steps for those target chunks (as many as acting: backed-up chunks from the acting distribution)"""
    bon: int = 8
    """chunks sampled when acting, best by the critic; 1 = plain π₀"""
    bon_slice: int = 0
    """score the --bon candidates in slices of this many (lax.map) to bound memory; 0: all at once"""
    act_pessimism: float = 1.0
    """β: acting ranks candidates by ensemble mean − β·std"""
    cql_weight: float = 0.2
    """offline conservative penalty: mean Q of π₀ chunks at o_t minus Q of the data chunk, in critic units (0: off;
    why 0.2: docs/results/ogbench.md)"""
    cql_bound: bool = True
    """Cal-QL (Nakamoto et al., 2023): the penalty pushes π₀'s chunks down only to the data's Monte Carlo return"""
    actor_weight: float = 0.0
    """weight of −Q(o, π₀(o)) back-propagated through the sampling steps (offline and online)"""
    distill_weight: float = 1.0
    """online: weight of flow matching on the chunks best-of-N chose (0, with --actor-weight 0: π₀ frozen online)"""
    topk: int = 0
    """online acting: draw among the --topk best candidates, softmax of score / (temperature × score std); 0: argmax"""
    select_temp: float = 1.0
    """the --topk temperature (its start with --adapt-temp)"""
    adapt_temp: float = 0.0
    """rate of the --topk temperature's log rising while π₀'s sample log-std is below its online start (0: fixed)"""
    utd: int = 16
    """online critic updates per env chunk step, run in one jitted scan; π₀ learns once per chunk step, so π₀ has
    --online-steps / --utd online updates"""
    learning_starts: int = 32_000
    """online chunks collected before the first online critic update (fitted to a tiny buffer the critic over-fits)"""
    online_batch_size: int = 256
    """transitions per online critic update (cached features: cheap)"""
    online_fraction: float = 0.5
    """share of online transitions in each online batch (RLPD: 0.5)"""
    buffer_size: int = 200_000
    """replay buffer capacity in chunks (it keeps only the critic's cached arrays, ~20 kB a chunk for π₀)"""


# The flags that depend on the env, per env (--env picks one; "gym": any other gymnasium id). push's are the defaults
# above (2 critics run ~3× the updates/s of 10 on 2 cores); libero's fit 16 cores and 128 GB.
CONFIGS = {
    "push": Args(
        env="push",
        action_horizon=5,
        num_envs=64,
        eval_episodes=100,
        eval_envs=100,
        pi0_preset="cpu",
        lr=1e-3,
        critic_lr=1e-3,
        gamma=0.95,
        num_qs=2,
        target_n=1,
        bon=8,
        utd=16,  # π₀ learns once per acting call: 16,000 / 16 = 1,000 online π₀ updates
        learning_starts=32_000,
    ),
    "libero": Args(
        env="libero",
        action_horizon=10,
        num_envs=16,
        eval_episodes=50,
        eval_envs=16,
        pi0_preset="pi0",
        lr=2.5e-5,
        critic_lr=3e-4,
        gamma=0.99,
        num_qs=10,
        target_n=8,
        bon=32,
        utd=4,
        learning_starts=5000,
    ),
    "gym": Args(
        env="gym",
        action_horizon=5,
        num_envs=16,
        eval_episodes=100,
        eval_envs=16,
        pi0_preset="cpu",
        lr=3e-4,
        critic_lr=3e-4,
        gamma=0.99,
        num_qs=10,
        target_n=4,
        bon=8,
        utd=4,
        learning_starts=5000,
    ),
}


def check(args: Args) -> Args:
    """The run's flags (a resumed run's own), LIBERO's inputs found in the caches; inconsistent flags refused."""
    args = runlog.prepared(args, "acrlpd_pi0", CONFIGS, data_with_checkpoint="optional")
    if args.pi0_checkpoint and args.dataset is None and args.offline_steps > 0:  # no prior data: online from π₀
        if args.offline_steps != runlog.configured(CONFIGS, args.env).offline_steps:  # given on the command line
            raise RunError(
                f"--offline-steps {args.offline_steps} needs prior data: pass --dataset, or leave the flag out to "
                "run online only from --pi0-checkpoint"
            )
        print("--pi0-checkpoint without --dataset: no prior data, so no offline phase (--offline-steps 0)")
        args = dataclasses.replace(args, offline_steps=0)
    runlog.check_at_least(args, 1, "updates_per_call", "batch_size", "online_batch_size", "utd", "num_envs", "bon")
    runlog.check_at_least(args, 1, "target_n", "num_qs", "action_horizon", "flow_steps", "target_flow_steps")
    runlog.check_at_least(args, 1, "eval_episodes", "eval_envs", "buffer_size")
    runlog.check_at_least(args, 0, "image_size")
    if not args.critic_hidden or min(args.critic_hidden) < 1:
        raise RunError(f"--critic-hidden {' '.join(map(str, args.critic_hidden))}: one width ≥ 1 per hidden layer")
    runlog.check_at_least(args, 0, "offline_steps", "online_steps", "learning_starts", "bon_slice", "topk")
    runlog.check_at_least(args, 0, "distill_weight", "actor_weight", "adapt_temp", "cql_weight")
    runlog.check_at_least(args, 0, "log_every", "eval_every", "save_every")
    runlog.check_ranges(args, gamma=(0, 1), tau=(0, 1), lr=(0, None), critic_lr=(0, None), max_grad_norm=(0, None))
    runlog.check_ranges(args, select_temp=(0, None))
    if args.topk > args.bon:
        raise RunError(f"--topk {args.topk} > --bon {args.bon}: the draw is among the --bon candidates")
    if args.q_agg == "min2" and args.num_qs < 2:
        raise RunError("--q-agg min2 needs --num-qs >= 2")
    if args.learning_starts > args.buffer_size:
        raise RunError(f"--learning-starts {args.learning_starts} > --buffer-size {args.buffer_size}: never updates")
    if args.bon_slice and args.bon % args.bon_slice:
        raise RunError(f"--bon-slice {args.bon_slice} must divide --bon {args.bon}")
    runlog.check_ema(
        args.ema_decay, args.offline_steps + args.online_steps // args.utd, "offline and online π₀ updates"
    )
    if not 0 <= args.online_fraction <= 1:
        raise RunError(f"--online-fraction must be in [0, 1] (got {args.online_fraction})")
    return args


# ----------------------------------------------------------------------------------------------------- networks
class Critic(nn.Module):
    """One ensemble member Q(o, a_{t:t+H}): Dense → LayerNorm → GELU blocks, a scalar out."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):  # [..., W+S+H·A] -> [...]
        for width in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(width)(x)))
        return nn.Dense(1)(x)[..., 0]


@dataclass(frozen=True)
class Nets:
    """π₀, the env ↔ π₀ plumbing and the critic: what the losses and the acting functions close over."""

    pi: pi0.Pi0
    io: pi0.EnvIO
    critic: Critic
    ret: tuple[float, float] = (0.0, 1.0)  # (μ, σ): Q in critic units (return − μ) / σ, see `return_units`


def return_units(offline: data.ChunkDataset | None) -> tuple[float, float]:
    """(μ, σ), the mean and std of the prior data's Monte Carlo returns from o_t: the critic learns in critic units
    (return − μ) / σ, so that its learning rate and --cql-weight hold at any reward scale. (0, 1) without prior data."""
    if offline is None or len(offline) == 0:
        return 0.0, 1.0
    mu = float(offline.return_to_go.mean())
    sigma = float(offline.return_to_go.std())
    return mu, sigma if sigma > 0 else 1.0


def critic_obs(prefix: pi0.Prefix) -> jax.Array:
    """The critic's view of observations [B,W+S]: π₀'s pooled prefix features (constants) and normalised states."""
    return jnp.concatenate([jax.lax.stop_gradient(prefix.features), prefix.state], -1)


def q_values(nets: Nets, cparams, obs_z, chunks):
    """Ensemble values of executed chunks [B,N,H,A] (normalised) at critic views [B,W+S] -> [E,B,N]."""
    B, N = chunks.shape[:2]
    z = jnp.broadcast_to(obs_z[:, None], (B, N, obs_z.shape[-1]))
    x = jnp.concatenate([z, chunks.reshape(B, N, -1)], -1)
    return jax.vmap(nets.critic.apply, in_axes=(0, None))({"params": cparams}, x)  # members vmapped


def best_of_n(
    nets: Nets,
    params,
    cparams,
    prefix,
    rng,
    n: int,
    steps: int,
    beta: float,
    slice_: int = 0,
    topk: int = 0,
    temp: float = 1.0,
):
    """n π₀ chunks per observation from one prefix (in slices of `slice_`), the best by s = mean − β·std (or drawn
    among the `topk` best, softmax of s / (temp·std of s)) -> chunk [B,H_m,A_m], q [B], and the candidates' spread
    [B] (log std over the n, averaged over executed steps and dims: π₀'s sample entropy up to a constant)."""
    obs_z = critic_obs(prefix)

    def score(cand):  # [B,S,H_m,A_m] -> the ensemble's mean and std of the executed part [B,S]
        q = q_values(nets, cparams, obs_z, nets.io.executed(cand))  # [E,B,S]
        return q.mean(0), q.std(0)

    cand, (qm, qs) = nets.pi.sample_scored(params, prefix, rng, n, steps, score, slice_)  # [B,n,H_m,A_m], [B,n]
    score = qm - beta * qs  # [B,n]
    idx = jnp.argmax(score, axis=1)  # [B]
    if topk > 1:  # exploration: a draw among the top k, in units of the candidates' spread (any reward scale)
        top, top_idx = jax.lax.top_k(score, topk)  # [B,k]
        logits = top / (temp * score.std(1, keepdims=True) + 1e-6)
        draw = jax.random.categorical(jax.random.fold_in(rng, n), logits)  # [B] in 0..k-1
        idx = jnp.take_along_axis(top_idx, draw[:, None], 1)[:, 0]
    rows = jnp.arange(idx.shape[0])
    spread = jnp.log(nets.io.executed(cand).std(1) + 1e-6).mean((-2, -1))
    return cand[rows, idx], qm[rows, idx], spread


def encode(nets: Nets, args: Args, params, obs, rng, views_only: bool = False):
    """What the critic needs of observations: views [B,W+S] and --target-n executed π₀ chunks [B,N,H,A] (or None)."""
    prefix = nets.pi.prefix(params, nets.io.observe(obs))
    if views_only:
        return jax.lax.stop_gradient((critic_obs(prefix), None))
    cand = nets.io.executed(nets.pi.sample_n(params, prefix, rng, args.target_n, args.target_flow_steps))
    return jax.lax.stop_gradient((critic_obs(prefix), cand))


# ----------------------------------------------------------------------------------------------------- losses
TD_KEYS = ("discounted_return", "n_valid", "mask")  # what the TD target reads of a chunk transition
BC_KEYS = ("obs", "actions", "valid")  # what the BC term reads
SHOW = ("losses/bc", "losses/distill", "losses/critic", "charts/q_data")  # on the progress lines


def td_target(cparams, target_cparams, batch, rng, nets: Nets, args: Args):
    """y = R + γ^{n_valid}·mask·Q̄(o_{t+H}, a′), a′ = the argmax over the --target-n π₀ chunks `next_cand`
    [B,N,H,A] of the online critic's mean (the expected-max backup); a constant (stop_gradient) -> y [B], info."""
    next_z, next_cand = batch["next_obs_z"], batch["next_cand"]
    best = jnp.argmax(q_values(nets, cparams, next_z, next_cand).mean(0), axis=1)  # [B]
    a_next = next_cand[jnp.arange(best.shape[0]), best]  # [B,H,A]
    q_next = q_values(nets, target_cparams, next_z, a_next[:, None])[:, :, 0]  # [E,B]
    pair = lambda: jax.random.choice(rng, q_next.shape[0], (2,), replace=False)  # min2: a random pair's min (RLPD)
    q_bar = q_next[pair()].min(0) if args.q_agg == "min2" else q_next.mean(0)
    mu, sigma = nets.ret  # the bootstrap back in reward units, the target in critic units
    discount = args.gamma ** batch["n_valid"].astype(jnp.float32)  # the bootstrap is n_valid steps away
    y = (batch["discounted_return"] + discount * batch["mask"] * (mu + sigma * q_bar) - mu) / sigma
    return jax.lax.stop_gradient(y), {"charts/q_target": mu + sigma * y.mean()}  # charts: reward units


def critic_loss(cparams, batch, y, nets: Nets, args: Args):
    """TD regression of every member on y, + the offline conservative term with `cand` (π₀'s chunks at o_t)."""
    q_data = q_values(nets, cparams, batch["obs_z"], batch["chunk"][:, None])[:, :, 0]  # [E,B]
    loss = jnp.mean(jnp.square(q_data - y[None]))
    info = {"losses/critic": loss, "charts/q_data": nets.ret[0] + nets.ret[1] * q_data.mean()}
    if "cand" in batch and args.cql_weight > 0:  # push π₀'s own chunks at o_t down relative to the data chunk
        q_pi = q_values(nets, cparams, batch["obs_z"], batch["cand"])  # [E,B,N]
        if args.cql_bound:  # Cal-QL: no lower than the data's Monte Carlo return (in critic units)
            q_pi = jnp.maximum(q_pi, (batch["return_to_go"][None, :, None] - nets.ret[0]) / nets.ret[1])
        gap = q_pi.mean(-1) - q_data  # [E,B]
        loss = loss + args.cql_weight * gap.mean()
        info["losses/cql_gap"] = gap.mean()
    return loss, info


def bc_loss(params, prefix, batch, rng, nets: Nets):
    """Flow matching on data chunks, padded steps past an episode's end not imitated -> (loss, info)."""
    actions = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m], relative where π₀ is
    w = batch["valid"].astype(jnp.float32)  # [B,H]
    per_step = nets.pi.flow_loss(params, prefix, actions, rng)  # [B,H_m]
    loss = (per_step * nets.io.step_weights(w)).sum() / jnp.maximum(w.sum(), 1.0)
    return loss, {"losses/bc": loss}


def actor_loss(nets: Nets, params, cparams, prefix, rng, args: Args):
    """−Q(o, π₀(o)) back-propagated through the Euler steps of one π₀ chunk; the critic is a constant."""
    act = nets.io.executed(nets.pi.sample_n(params, prefix, rng, 1, args.flow_steps))
    return -q_values(nets, jax.lax.stop_gradient(cparams), critic_obs(prefix), act).mean()


def joint_loss(train, batch, rng, target_cparams, policy, nets: Nets, args: Args):
    """Offline: BC (flow matching, weighted by valid) + the critic's TD (+ CQL, + actor term), the critic's π₀ chunks
    from `policy`, the weights that act (`acting_params`) -> (loss, info)."""
    k_flow, k_next, k_cand, k_target, k_actor = jax.random.split(rng, 5)
    prefix = nets.pi.prefix(train["params"], nets.io.observe(batch["obs"]))  # the one VLM pass for o_t
    prefix = jax.lax.stop_gradient(prefix) if args.freeze_backbone else prefix
    bc, info_bc = bc_loss(train["params"], prefix, batch, k_flow, nets)
    frozen, policy = jax.lax.stop_gradient((train, policy))  # the critic's inputs and targets never train π₀
    next_z, next_cand = encode(nets, args, policy, batch["next_obs"], k_next)
    cand = nets.pi.sample_n(policy, jax.lax.stop_gradient(prefix), k_cand, args.target_n, args.target_flow_steps)
    chunk = nets.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m]: the data chunk in π₀'s form
    cb = {k: batch[k] for k in (*TD_KEYS, "return_to_go")}  # the critic's batch
    cb.update(obs_z=critic_obs(prefix), chunk=nets.io.executed(chunk), cand=nets.io.executed(cand))
    cb.update(next_obs_z=next_z, next_cand=next_cand)
    y, info_t = td_target(frozen["critic"], target_cparams, cb, k_target, nets, args)
    c_loss, info = critic_loss(train["critic"], cb, y, nets, args)
    loss = args.bc_weight * bc + c_loss
    info.update(info_t)
    info.update(info_bc)
    if args.actor_weight > 0:
        info["losses/actor"] = actor_loss(nets, train["params"], train["critic"], prefix, k_actor, args)
        loss = loss + args.actor_weight * info["losses/actor"]
    return loss, info


def pi_loss(params, prefix, chosen, bc_batch, cparams, rng, nets: Nets, args: Args):
    """Online π₀ (VLM frozen: `prefix` is a constant and the critic's cached views stay valid): flow matching on the
    chunks best-of-N chose `chosen` [B,H_m,A_m] (distillation), + actor term, + BC on prior data -> (loss, info)."""
    k_distill, k_actor, k_bc = jax.random.split(rng, 3)
    terms = {}  # name: (weight, loss)
    if args.distill_weight > 0:
        terms["distill"] = (args.distill_weight, nets.pi.flow_loss(params, prefix, chosen, k_distill).mean())
    if args.actor_weight > 0:
        terms["actor"] = (args.actor_weight, actor_loss(nets, params, cparams, prefix, k_actor, args))
    if bc_batch is not None:  # the prior data's prefixes: the frozen VLM's, one pass
        bc_prefix = jax.lax.stop_gradient(nets.pi.prefix(params, nets.io.observe(bc_batch["obs"])))
        terms["bc"] = (args.bc_weight, bc_loss(params, bc_prefix, bc_batch, k_bc, nets)[0])
    return sum(w * v for w, v in terms.values()), {f"losses/{k}": v for k, (_, v) in terms.items()}


# ----------------------------------------------------------------------------------------------------- update
def expert_part(nets: Nets, params):
    """π₀'s weights outside the VLM (action expert, projections): what trains online and what θ̄ averages."""
    return pi0.trained_part(params, nets.pi.optimizer_labels(params, "train", freeze_backbone=True))


def acting_params(state):
    """π₀'s weights that act (best-of-N, evaluations, the critic's π₀ chunks, export): θ with θ̄ in place when kept.
    The VLM's weights are θ's in both: the prefix pass, and the critic's features, are the same."""
    return pi0.overlaid(state["params"], state["ema"]) if state["ema"] else state["params"]


def make_optimizers(args: Args, nets: Nets, params):
    """π₀ offline: clipped Adam (under --freeze-backbone the VLM's parameters get zero updates); π₀ online: the same
    with the VLM always frozen (the critic reads its features), its own Adam state; critic: Adam."""
    tx = {"train": optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.lr))}
    pi_tx = lambda freeze: optax.multi_transform(
        {**tx, "frozen": optax.set_to_zero()}, nets.pi.optimizer_labels(params, "train", freeze)
    )
    return pi_tx(args.freeze_backbone), pi_tx(True), optax.adam(args.critic_lr)


def make_update(nets: Nets, args: Args, tx, critic_tx):
    """The offline joint update and the online critic update: (state, batches [U,B,...], rng) -> (state, info)."""

    def joint(state, batch, rng):
        train = {"params": state["params"], "critic": state["critic"]}
        grad_fn = jax.value_and_grad(joint_loss, has_aux=True)
        (_, info), g = grad_fn(train, batch, rng, state["target_critic"], acting_params(state), nets, args)
        updates, opt = tx.update(g["params"], state["opt"], state["params"])
        c_updates, critic_opt = critic_tx.update(g["critic"], state["critic_opt"], state["critic"])
        critic = optax.apply_updates(state["critic"], c_updates)
        params = optax.apply_updates(state["params"], updates)
        target = optax.incremental_update(critic, state["target_critic"], args.tau)
        new = {**state, "params": params, "opt": opt}
        new.update(critic=critic, critic_opt=critic_opt, target_critic=target)
        if state["ema"]:  # θ̄ ← d·θ̄ + (1 − d)·θ
            new["ema"] = optax.incremental_update(expert_part(nets, params), state["ema"], 1 - args.ema_decay)
        return new, info

    def critic_only(state, batch, rng):  # batch: cached critic views and chunks (`encode`), no π₀ pass
        y, info_t = td_target(state["critic"], state["target_critic"], batch, rng, nets, args)
        (_, info), g = jax.value_and_grad(critic_loss, has_aux=True)(state["critic"], batch, y, nets, args)
        c_updates, critic_opt = critic_tx.update(g, state["critic_opt"], state["critic"])
        critic = optax.apply_updates(state["critic"], c_updates)
        target = optax.incremental_update(critic, state["target_critic"], args.tau)
        return {**state, "critic": critic, "critic_opt": critic_opt, "target_critic": target}, {**info, **info_t}

    return mesh.scan_updates(joint), mesh.scan_updates(critic_only)


def online_batches(nets: Nets, args: Args, params, offline, buffer, run: runlog.Run, rng, bs=1024):
    """The online critic's batch sampler, (np_rng, n) -> a batch of cached arrays, RLPD's symmetric sampling:
    --online-fraction of the rows from the replay buffer (once it holds anything), the rest from the prior data (first
    in the batch). The prior data's arrays are computed here once: the critic's views of every frame and the data
    chunks in π₀'s form (valid while the VLM is frozen), and --target-n π₀ chunks at every frame (sampled once, at the
    start of the online phase, and kept in the run folder so that a resumed run backs up the same chunks)."""

    def buffer_rows(j):
        rows = {k: getattr(buffer, k)[j] for k in TD_KEYS}
        return {**rows, **{k: v[j] for k, v in buffer.extras.items()}}

    if offline is None:  # no prior data: every row from the buffer
        return lambda np_rng, n: buffer_rows(np_rng.integers(0, len(buffer), n))
    episodes = offline.data
    enc = jax.jit(partial(encode, nets, args), static_argnames="views_only")
    kept = run.kept("critic_cache")  # a resumed run reads the target chunks back: it encodes the views alone

    def encode_rows(i):
        return enc(params, data.gather_obs(episodes.obs, i), jax.random.fold_in(rng, i[0]), bool(kept))

    obs_z, cand = mesh.map_batches(encode_rows, len(episodes), bs)  # every frame once: [F,W+S], [F,N,H,A] or None
    if kept:
        cand = kept["cand"]
    else:
        cand = run.keep("critic_cache", {"cand": cand})["cand"]
    to_model = jax.jit(lambda a, s: nets.io.executed(nets.io.to_model(a, s)))

    def chunk_rows(i):
        return to_model(episodes.actions[offline.action_idx[i]], episodes.obs["state"][offline.obs_idx[i]])

    chunk = mesh.map_batches(chunk_rows, len(offline), bs)  # [C,H,A]: the data chunks as the critic reads them

    def sample(np_rng, n):
        n_online = int(round(n * args.online_fraction)) if len(buffer) else 0
        i = np_rng.integers(0, len(offline), n - n_online)  # prior-data chunks
        j = np_rng.integers(0, len(buffer) or 1, n_online)  # buffer rows
        o, nxt = offline.obs_idx[i], offline.next_obs_idx[i]
        rows = {k: getattr(offline, k)[i] for k in TD_KEYS}
        rows.update(chunk=chunk[i], obs_z=obs_z[o], next_obs_z=obs_z[nxt], next_cand=cand[nxt])
        if n_online == 0:
            return rows
        online = buffer_rows(j)
        return {k: np.concatenate([v, online[k]]) for k, v in rows.items()}

    return sample


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(nets: Nets, args: Args, pi_tx):
    """`act` (evaluations, the online warm-up) and `act_learn` (online: act, then a π₀ update)."""

    @partial(jax.jit, static_argnames=("n", "topk", "learning"))
    def act(state, obs, rng, n: int, beta: float, topk: int = 0, learning: bool = False):
        """Best of n by mean − β·std (n = 1: plain π₀) -> env-unit chunk [B,H,A], critic mean [B], and the buffer's
        cache: critic view [B,W+S], executed chunk [B,H,A]; `learning`: and (prefix, chunk [B,H_m,A_m], spread [B])."""
        params = acting_params(state)  # θ̄
        prefix = nets.pi.prefix(params, nets.io.observe(obs))  # the one VLM pass
        temp = jnp.exp(state["temp"]["log"]) if state["temp"] else 1.0  # --topk's temperature (online acting only)
        slice_ = args.bon_slice if n == args.bon else 0
        chunk, q, spread = best_of_n(
            nets, params, state["critic"], prefix, rng, n, args.flow_steps, beta, slice_, topk, temp
        )
        q = nets.ret[0] + nets.ret[1] * q  # reward units (the evaluations' calibration)
        rows = (nets.io.to_env(chunk, obs["state"]), q, critic_obs(prefix), nets.io.executed(chunk))
        if learning:
            return rows, (prefix, chunk, spread)
        return rows

    def act_learn(state, obs, bc_batch, rng):
        """`act` with --bon (and --topk), then one π₀ update on this prefix and the chosen chunks (VLM frozen) and on
        a prior-data batch (or None) -> new state, info, `act`'s rows."""
        k_act, k_pi = jax.random.split(rng)
        rows, (prefix, chosen, spread) = act(state, obs, k_act, args.bon, args.act_pessimism, args.topk, True)
        prefix, chosen, h = jax.lax.stop_gradient((prefix, chosen, spread.mean()))
        temp = state["temp"]
        if args.adapt_temp:  # the --topk temperature rises while π₀'s sample entropy is below its start value
            target = jnp.where(temp["set"], temp["target"], h)
            temp = {"log": temp["log"] + args.adapt_temp * (target - h), "target": target, "set": jnp.ones((), bool)}
        grad_fn = jax.value_and_grad(pi_loss, has_aux=True)
        (_, info), g = grad_fn(state["params"], prefix, chosen, bc_batch, state["critic"], k_pi, nets, args)
        updates, opt = pi_tx.update(g, state["pi_opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        info.update({"charts/sample_log_std": h, "charts/select_temp": jnp.exp(temp["log"])})
        new = {**state, "params": params, "pi_opt": opt, "temp": temp}
        if state["ema"]:  # θ̄ ← d·θ̄ + (1 − d)·θ
            new["ema"] = optax.incremental_update(expert_part(nets, params), state["ema"], 1 - args.ema_decay)
        return new, info, *rows

    return act, jax.jit(act_learn, donate_argnums=0)


def evaluate(act, state, args: Args, spec: envs.EnvSpec, rng, label: str, run: runlog.Run, step: int) -> dict:
    """Best-of-N and plain π₀, each on the same --eval-episodes episodes every time (one `rng`): success, return and
    the critic's calibration (its value of the chunks it chose vs the discounted return that followed); printed.
    --capture-video: the first --video-episodes episodes of each written as videos (`run.log_videos`)."""
    where = dict(episodes=args.eval_episodes, num_envs=args.eval_envs, seed=args.seed + 10_000)
    where.update(horizon=args.action_horizon, gamma=args.gamma, record=args.recorded_episodes)

    def best_of(n, beta):  # the best of n chunks by mean − β·std: (obs, key) -> (chunk, its Q)
        return lambda obs, key: act(state, obs, key, n, beta)[:2]

    policies = {"": (f"BoN-{args.bon}", best_of(args.bon, args.act_pessimism)), "plain_": ("plain π₀", best_of(1, 0.0))}
    videos = {"": f"bon{args.bon}", "plain_": "plain"}  # the policies' names in the videos' file names
    out, shown = {}, []
    for prefix, (name, policy) in policies.items():
        metrics, trace = envs.evaluate(spec, policy, rng, prefix=prefix, **where)
        run.log_videos(step, videos[prefix], trace.videos)
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
    nets = Nets(policy.model, policy.io, Critic(tuple(args.critic_hidden)), return_units(offline))
    x = jnp.zeros((1, cfg.vlm.width + (cfg.state_dim or cfg.action_dim) + args.action_horizon * env.action_dim))
    critic = jax.jit(jax.vmap(lambda k: nets.critic.init(k, x)["params"]))(jax.random.split(k_critic, args.num_qs))
    tx, pi_tx, critic_tx = make_optimizers(args, nets, policy.params)
    learns = args.online_steps > 0 and (args.distill_weight > 0 or args.actor_weight > 0)  # π₀ trained online
    state = {"params": policy.params, "opt": tx.init(policy.params), "critic": critic, "pi_opt": {}, "temp": {}}
    if learns:  # π₀'s online optimiser state, and --topk's temperature
        state["pi_opt"] = pi_tx.init(policy.params)
        log_temp = jnp.log(jnp.float32(args.select_temp))  # not weak-typed: the update returns float32 (compile once)
        state["temp"] = {"log": log_temp, "target": jnp.zeros(()), "set": jnp.zeros((), bool)}
    state.update(critic_opt=critic_tx.init(critic), target_critic=jax.tree.map(jnp.copy, critic))
    state["ema"] = jax.tree.map(jnp.copy, expert_part(nets, policy.params)) if args.ema_decay > 0 else {}  # θ̄
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))
    n_pi = pi0.param_count(state["params"]) / 1e6
    n_critic = pi0.param_count(state["critic"]) / args.num_qs / 1e3
    print(f"π₀ {n_pi:.2f}M params, critic {args.num_qs}×{n_critic:.0f}k, {len(offline or ())} chunks from {path}")
    run = runlog.Run(args, "acrlpd_pi0")
    buffer = data.ReplayBuffer(args.buffer_size, args.action_horizon, args.gamma)  # TD arrays + critic's cache

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

    # ---- loop: offline (π₀ and critic on the prior data), then online (critic on cached views, π₀ when acting)
    joint_update, critic_update = make_update(nets, args, tx, critic_tx)
    act, act_learn = make_act(nets, args, pi_tx)
    act = mesh.host_local(act, dev_mesh)  # each process acts on its own envs
    act_learn = mesh.host_local(act_learn, dev_mesh, keep=2)
    encode_next = mesh.host_local(jax.jit(partial(encode, nets, args)), dev_mesh)
    keys = ("obs", "next_obs", "actions", "valid", "return_to_go", *TD_KEYS)
    total = args.offline_steps + args.online_steps
    results, info = {}, {}
    if step == 0 and run.saved_step is None:  # π₀ (and the untrained critic's ranking) before any update
        m = evaluate(act, state, args, spec, k_eval, "start, update 0", run, 0)
        run.log(0, m)
        results.update({f"start/{k}": v for k, v in m.items()})
    for phase, end in (("offline", args.offline_steps), ("online", total)):
        t_phase, s_phase = time.time(), step
        warm = 10 * len(buffer) // max(args.learning_starts, 1)  # tenths of the warm-up reported so far
        if phase == "online" and step < end:  # the VLM is frozen from here: encode the prior data once
            sample_online = online_batches(nets, args, acting_params(state), offline, buffer, run, k_cache)
            print(f"critic cache of {len(offline or ())} offline chunks ready in {time.time() - t_phase:.0f}s")
        while step < end:
            key = jax.random.fold_in(jax.random.fold_in(k_run, step), len(buffer))  # warm-up steps add no updates
            k_act, k_update, k_next = jax.random.split(key, 3)
            np_rng = np.random.default_rng([args.seed, step])  # the data order, a function of the step (resume)
            if phase == "offline":
                n = min(args.updates_per_call, end - step)
                bs = [offline.sample(np_rng, args.batch_size, keys) for _ in range(n)]
                state, info = joint_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
            else:  # one chunk in every env (π₀ learns from it), cache what the critic reads, --utd critic updates
                n = 0  # critic updates after this chunk: none while the buffer warms up
                if len(buffer) + args.num_envs >= args.learning_starts:
                    n = min(args.utd, end - step)
                if n and learns:
                    bc = None  # π₀'s BC anchor on the prior data, where there is some
                    if offline is not None:
                        bc = mesh.place_batch(offline.sample(np_rng, args.batch_size, BC_KEYS), dev_mesh)
                    state, pi_info, chunk, _, obs_z, executed = act_learn(state, obs, bc, k_act)
                else:
                    chunk, _, obs_z, executed = act(state, obs, k_act, args.bon, args.act_pessimism)
                next_obs, cs = envs.execute_chunk(env, obs, np.asarray(chunk), args.gamma)
                next_z, next_cand = encode_next(acting_params(state), cs.final_obs, k_next)  # o_{t+H}, before a reset
                extras = {"obs_z": obs_z, "chunk": executed, "next_obs_z": next_z, "next_cand": next_cand}
                cs, extras = mesh.all_rows(jax.device_get((cs, extras)))  # every process's envs: one buffer for all
                buffer.add(cs, extras)
                ep_success = (ep_success + cs.success[cs.terminated | cs.truncated].tolist())[-100:]
                obs = next_obs
                if n:
                    bs = [sample_online(np_rng, args.online_batch_size) for _ in range(n)]
                    state, info = critic_update(state, mesh.stack_batches(bs, dev_mesh), k_update)
                    if learns:
                        info = {**info, **pi_info}
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
