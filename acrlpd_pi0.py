"""Offline-to-online Q-chunking with prior data (RLPD on action chunks), π₀ as the policy.

Method: Li, Zhou and Levine, "Reinforcement Learning with Action Chunking" (2025) on top of RLPD (Ball et al., 2023).
  - π₀'s flow-matching loss on data chunks is the behaviour-cloning term (--bc-weight).
  - A critic ensemble (--num-qs LayerNorm MLPs) reads [stop_gradient(π₀ prefix features), state, H×A chunk] and
    learns the chunked n-step TD target   y = Σ_{k<H} γ^k r_{t+k} + γ^H · mask · Q̄(o_{t+H}, a′),
    a′ = the best of --target-n π₀ chunks at o_{t+H} ranked by the online critic (expected-max backup),
    Q̄ = the target ensemble's mean (or the min of a random pair, --q-agg min2); targets Polyak-averaged (τ).
  - Acting: --bon N chunks from one prefix pass, the one with the highest pessimistic value mean − β·std of the
    ensemble (--act-pessimism β) is executed open loop. --bon 1 is plain π₀.
  - Conservative term (--cql-weight, offline): the critic's mean value of π₀'s own chunks at o_t minus that of the
    data chunk, bounded below by the data's Monte Carlo return (Cal-QL).
  - Offline phase on the prior data: one jitted update trains π₀ (BC) and the critic together.
  - Online phase, π₀ frozen as the proposal distribution: each env chunk step stores the pooled features, state and
    --target-n π₀ chunks of o_t and o_{t+H} that acting computed anyway, and --utd critic updates run on those cached
    arrays (50/50 offline/online batches, one lax.scan): no VLM or flow pass per update, ~20× more critic updates per
    second, after --learning-starts online chunks. That made best-of-N work on push: π₀'s candidates differ a lot
    (ranked by rollouts from cloned env states: 95% vs 40%); a critic fitted to the demonstrator's data ranks them
    worse than chance, one fitted to many of π₀'s own chunks well, unless it first over-fits a small buffer.
Every evaluation logs the critic's calibration: its value of the chunks it chose (eval/*q_pred) against the
discounted return that actually followed (eval/*q_realised).

  python acrlpd_pi0.py                                   # push, CPU π₀ preset, offline then online, < 10 min
  python acrlpd_pi0.py --env libero --dataset DIR --pi0-checkpoint CKPT --bon 32   # GPUs
  python acrlpd_pi0.py --offline-steps 20 --online-steps 8 --eval-episodes 4 --batch-size 8   # smoke
"""

from __future__ import annotations

import dataclasses
import os
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
from jax.sharding import NamedSharding, PartitionSpec

from common import envs, libero, mesh, pi0, qchunk, runlog

# Values by platform; a flag given explicitly (not None) wins. Matched by substring of --env. Each preset edits _BASE.
_BASE = dict(num_qs=10, lr=2.5e-5, critic_lr=3e-4, bc_weight=1.0, gamma=0.99, num_envs=16, utd=4, learning_starts=5000)
# push, measured: 2 members run ~3× the critic updates/s of 10 on 2 cores; --target-n 1 backs up π₀'s own chunk
_PUSH = dict(action_horizon=5, bon=8, target_n=1, num_qs=2, lr=1e-3, critic_lr=1e-3, gamma=0.95, num_envs=64, utd=32)
PRESETS = {
    "push": dict(_BASE, **_PUSH, learning_starts=32_000),
    "libero": dict(_BASE, action_horizon=10, bon=32, target_n=8),
    "aloha": dict(_BASE, action_horizon=50, bon=16, target_n=8),
    "droid": dict(_BASE, action_horizon=10, bon=16, target_n=8),
}


@dataclass
class Args(runlog.RunArgs):
    exp_name: str = "acrlpd_pi0"
    """name of this experiment (run folder and wandb)"""
    env: str = "push"
    """'push' (embedded), 'libero', or any gymnasium id; also picks the preset (push/libero/aloha/droid)"""
    dataset: str | None = None
    """prior data: robomimic/LIBERO HDF5 (file or folder) or a LeRobot folder; push default: noise-0.6 demos"""
    save_every: int = 2000
    """checkpoint every this many updates (and at the end)"""
    log_every: int = 200
    """log losses every this many updates"""
    eval_every: int = 0
    """evaluate every this many updates (0: only at the end of each phase)"""
    eval_episodes: int = 100
    """episodes per evaluation (run in parallel, one per env)"""
    num_envs: int | None = None
    """parallel environments in the online phase (preset)"""

    asset_id: str | None = None
    """norm-stats asset of the checkpoint (e.g. physical-intelligence/libero)"""
    action_horizon: int | None = None
    """H, the chunk length (preset)"""
    flow_steps: int = 5
    """Euler steps when acting"""
    image_size: int = 0
    """camera image size (push: 0 = state only; libero: 0 = the dataset's)"""

    offline_steps: int = 6000
    """updates on the prior data before going online"""
    online_steps: int = 16000
    """critic updates in the online phase (each env chunk step is followed by --utd of them)"""
    batch_size: int = 64
    """chunk transitions per update"""
    updates_per_call: int = 20
    """offline updates per jitted call (lax.scan)"""
    utd: int | None = None
    """online critic updates per env chunk step, run in one jitted scan (preset)"""
    learning_starts: int | None = None
    """online chunks collected before the first online critic update (preset): fitted to a tiny buffer it over-fits"""
    online_batch_size: int = 256
    """transitions per online critic update (cached features: cheap)"""
    gamma: float | None = None
    """per-step discount (preset; push 0.95: an 80-step task whose failures are time-outs)"""
    lr: float | None = None
    """π₀ learning rate (preset)"""
    critic_lr: float | None = None
    """critic learning rate (preset)"""
    bc_weight: float | None = None
    """weight of the flow-matching (BC) loss (preset)"""
    num_qs: int | None = None
    """critic ensemble size (preset)"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """critic MLP widths"""
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
    """weight of −Q(o, π₀(o)) back-propagated through the sampling steps"""
    freeze_backbone: bool = False
    """train only the action expert, the projections and the critic"""
    online_fraction: float = 0.5
    """share of online transitions in each online batch (RLPD: 0.5)"""
    buffer_size: int = 200_000
    """replay buffer capacity (chunks)"""


def resolve(args: Args) -> Args:
    """Fill the preset fields the user left at None."""
    preset = next((v for k, v in PRESETS.items() if k in args.env.lower()), PRESETS["push"])
    args = dataclasses.replace(args, **{k: v for k, v in preset.items() if getattr(args, k) is None})
    runlog.check_choices(args)
    if args.q_agg == "min2" and args.num_qs < 2:
        raise ValueError("--q-agg min2 needs --num-qs >= 2")
    if args.bon < 1 or args.target_n < 1:
        raise ValueError("--bon and --target-n must be >= 1")
    if args.learning_starts > args.buffer_size:
        raise ValueError(f"--learning-starts {args.learning_starts} > --buffer-size {args.buffer_size}: never updates")
    if args.bon_slice and args.bon % args.bon_slice:
        raise ValueError(f"--bon-slice {args.bon_slice} must divide --bon {args.bon}")
    return args


# ----------------------------------------------------------------------------------------------------- critic
class CriticMLP(nn.Module):
    """One Q(o, a_{t:t+H}) member: Dense → LayerNorm → GELU blocks, scalar out."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(h)(x)))
        return nn.Dense(1)(x)[..., 0]


# ----------------------------------------------------------------------------------------------------- losses
class Agent:
    """The model, the critic and the observation/action plumbing (`io`), closed over by the jitted functions."""

    def __init__(self, args: Args, model: pi0.Pi0, io: pi0.EnvIO):
        self.args, self.model, self.io = args, model, io
        self.critic = CriticMLP(tuple(args.critic_hidden))

    @staticmethod
    def head(prefix):  # -> [B,W+S] what the critic reads of an observation; never trains the VLM
        return jnp.concatenate([jax.lax.stop_gradient(prefix.features), prefix.state], -1)

    def q(self, cparams, head, chunks):
        """Ensemble values of executed chunks [B,N,H,A] (normalised) at heads [B,W+S] -> [E,B,N]; members vmapped."""
        B, N = chunks.shape[:2]
        x = jnp.concatenate([jnp.broadcast_to(head[:, None], (B, N, head.shape[-1])), chunks.reshape(B, N, -1)], -1)
        return jax.vmap(self.critic.apply, in_axes=(0, None))({"params": cparams}, x)

    def sample(self, params, prefix, rng, n: int, steps: int):  # -> executed part [B,n,H,A], whole chunk [B,n,H_m,A_m]
        c = self.model.config
        noise = jax.random.normal(rng, (prefix.mask.shape[0], n, c.action_horizon, c.action_dim))
        chunks = self.model.sample(params, prefix, noise, steps)
        return self.io.executed(chunks), chunks

    def best_of_n(self, params, cparams, prefix, rng, n: int, steps: int, beta: float, slice_: int = 0):
        """Sample n chunks per observation from one prefix, pick argmax of mean − β·std -> chunk [B,H_m,A_m], q [B]."""
        S, head = slice_ or n, self.head(prefix)

        def part(key):
            ex, cand = self.sample(params, prefix, key, S, steps)  # [B,S,H,A], [B,S,H_m,A_m]
            q = self.q(cparams, head, ex)  # [E,B,S]
            return cand, q.mean(0), q.std(0)

        cand, qm, qs = jax.lax.map(part, jax.random.split(rng, n // S))  # [n/S,B,S,...]
        cand, qm, qs = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n, *x.shape[3:]) for x in (cand, qm, qs))
        idx = jnp.argmax(qm - beta * qs, axis=1)  # [B]
        take = jnp.arange(idx.shape[0])
        return cand[take, idx], qm[take, idx]

    def encode(self, params, obs, rng):
        """What the critic needs of observations: heads [B,W+S] and --target-n executed π₀ chunks [B,N,H,A]."""
        prefix = self.model.prefix(params, self.io.observe(obs))
        cand, _ = self.sample(params, prefix, rng, self.args.target_n, self.args.target_flow_steps)
        return jax.lax.stop_gradient((self.head(prefix), cand))


def td_target(agent: Agent, cparams, target_cparams, batch, rng):
    """y = R + γ^{#valid}·mask·Q̄(o_{t+H}, a′), a′ = the argmax over the --target-n π₀ chunks `next_cand`
    [B,N,H,A] of the online critic's mean (the expected-max backup). A constant for every loss (stop_gradient).
    -> y [B], info."""
    next_head, next_cand = batch["next_head"], batch["next_cand"]
    best = jnp.argmax(agent.q(cparams, next_head, next_cand).mean(0), axis=1)  # [B]
    a_next = next_cand[jnp.arange(best.shape[0]), best]  # [B,H,A]
    q_next = agent.q(target_cparams, next_head, a_next[:, None])[:, :, 0]  # [E,B]
    if agent.args.q_agg == "min2":
        pair = jax.random.choice(rng, q_next.shape[0], (2,), replace=False)
        q_bar = q_next[pair].min(0)
    else:
        q_bar = q_next.mean(0)
    y = batch["discounted_return"] + batch["discount"] * batch["mask"] * q_bar
    return jax.lax.stop_gradient(y), {"charts/q_target": y.mean()}


def critic_loss(cparams, agent: Agent, batch, y):
    """TD regression of every member on y, plus the offline conservative term when `cand` (π₀'s chunks at o_t) is
    in the batch. -> (loss, info)."""
    q_data = agent.q(cparams, batch["head"], batch["chunk"][:, None])[:, :, 0]  # [E,B]
    loss = jnp.mean(jnp.square(q_data - y[None]))
    info = {"losses/critic": loss, "charts/q_data": q_data.mean()}
    if "cand" in batch and agent.args.cql_weight > 0:  # push π₀'s own chunks at o_t down relative to the data chunk
        q_pi = agent.q(cparams, batch["head"], batch["cand"])  # [E,B,N]
        if agent.args.cql_bound:  # Cal-QL: no lower than the data's Monte Carlo return
            q_pi = jnp.maximum(q_pi, batch["return_to_go"][None, :, None])
        gap = q_pi.mean(-1) - q_data  # [E,B]
        loss, info["losses/cql_gap"] = loss + agent.args.cql_weight * gap.mean(), gap.mean()
    return loss, info


def joint_loss(train, target_cparams, agent: Agent, batch, rng):
    """Offline: BC (flow matching, weighted by valid) + the critic's TD (+ CQL, + actor term) -> (loss, info)."""
    a, model = agent.args, agent.model
    k_flow, k_next, k_cand, k_t, k_actor = jax.random.split(rng, 5)
    prefix = model.prefix(train["pi"], agent.io.observe(batch["obs"]))  # the one VLM pass for o_t
    if a.freeze_backbone:
        prefix = jax.lax.stop_gradient(prefix)
    actions = agent.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m]
    w = batch["valid"].astype(jnp.float32)  # [B,H] padded steps past the episode's end are not imitated
    bc = model.flow_loss(train["pi"], prefix, actions, k_flow)  # [B,H_m]
    bc_loss = (bc * agent.io.step_weights(w)).sum() / jnp.maximum(w.sum(), 1.0)
    frozen = jax.lax.stop_gradient(train)  # the critic's inputs and targets never train π₀
    next_head, next_cand = agent.encode(frozen["pi"], batch["next_obs"], k_next)
    cand, _ = agent.sample(frozen["pi"], jax.lax.stop_gradient(prefix), k_cand, a.target_n, a.target_flow_steps)
    cb = {"head": agent.head(prefix), "chunk": agent.io.executed(actions), "cand": jax.lax.stop_gradient(cand),
          "next_head": next_head, "next_cand": next_cand}  # fmt: skip
    cb.update({k: batch[k] for k in (*TD_KEYS, "return_to_go")})
    y, info_t = td_target(agent, frozen["critic"], target_cparams, cb, k_t)
    c_loss, info = critic_loss(train["critic"], agent, cb, y)
    loss = a.bc_weight * bc_loss + c_loss
    info.update(info_t, **{"losses/bc": bc_loss})
    if a.actor_weight > 0:  # −Q(o, π₀(o)) through the Euler steps; the critic is a constant here
        act, _ = agent.sample(train["pi"], prefix, k_actor, 1, a.flow_steps)
        actor = -agent.q(jax.lax.stop_gradient(train["critic"]), agent.head(prefix), act).mean()
        loss, info["losses/actor"] = loss + a.actor_weight * actor, actor
    return loss, info


TD_KEYS = ("discounted_return", "discount", "mask")  # what the TD target reads of a chunk transition


def make_updates(agent: Agent, pi_tx, c_tx):
    """The offline joint update and the online critic update, each (state, batches [U,B,...], rng) -> (state, info)
    running U updates in one lax.scan."""

    def polyak(state, critic):
        return optax.incremental_update(critic, state["target"], agent.args.tau)

    def joint(state, batch, rng):
        train = {"pi": state["pi"], "critic": state["critic"]}
        (_, info), g = jax.value_and_grad(joint_loss, has_aux=True)(train, state["target"], agent, batch, rng)
        u_pi, opt_pi = pi_tx.update(g["pi"], state["opt_pi"], state["pi"])
        u_c, opt_c = c_tx.update(g["critic"], state["opt_c"], state["critic"])
        pi, critic = optax.apply_updates(state["pi"], u_pi), optax.apply_updates(state["critic"], u_c)
        new = {"pi": pi, "critic": critic, "target": polyak(state, critic), "opt_pi": opt_pi, "opt_c": opt_c}
        return {**state, **new}, info

    def critic_only(state, batch, rng):  # batch: cached heads and chunks (`encode`), no π₀ pass
        y, info_t = td_target(agent, state["critic"], state["target"], batch, rng)
        (_, info), g = jax.value_and_grad(critic_loss, has_aux=True)(state["critic"], agent, batch, y)
        u, opt_c = c_tx.update(g, state["opt_c"], state["critic"])
        critic = optax.apply_updates(state["critic"], u)
        return {**state, "critic": critic, "target": polyak(state, critic), "opt_c": opt_c}, {**info, **info_t}

    return mesh.scan_updates(joint), mesh.scan_updates(critic_only)


def make_tx(args: Args, model: pi0.Pi0, pi_params):
    """Adam for π₀ (clipped; under --freeze-backbone the VLM's parameters get zero updates) and for the critic."""
    frozen = model.backbone_mask(pi_params) if args.freeze_backbone else jax.tree.map(lambda _: False, pi_params)
    labels = jax.tree.map(lambda f: "frozen" if f else "pi", frozen)
    pi_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    return optax.multi_transform({"pi": pi_tx, "frozen": optax.set_to_zero()}, labels), optax.adam(args.critic_lr)


class CriticData:
    """Critic batches from cached arrays (the online phase): the offline chunks' heads and π₀ chunks, encoded once
    with the frozen π₀, and the online transitions' ones, stored in the replay buffer's extras when acting; mixed
    offline/online as `qchunk.MixedSampler` mixes (which also checks that data and env images have one shape)."""

    def __init__(self, agent: Agent, params, mix: qchunk.MixedSampler, rng, bs: int = 1024):
        offline = mix.offline
        data, enc = offline.data, jax.jit(agent.encode)
        heads, cands = [], []
        for lo in range(0, len(data), bs):  # every frame once; the last batch padded to keep one compiled shape
            i = np.minimum(np.arange(lo, lo + bs), len(data) - 1)
            h, c = jax.device_get(enc(params, qchunk.gather_obs(data.obs, i), jax.random.fold_in(rng, lo)))
            heads.append(h[: len(data) - lo]), cands.append(c[: len(data) - lo])
        self.head, self.cand = np.concatenate(heads), np.concatenate(cands)  # [F,W+S], [F,N,H,A]
        to_model = jax.jit(lambda a, s: agent.io.executed(agent.io.to_model(a, s)))
        self.chunk = np.concatenate([  # the data chunks as the critic reads them, [M,H,A]
            jax.device_get(to_model(data.actions[offline.action_idx[lo : lo + bs]],
                                    data.obs["state"][offline.obs_idx[lo : lo + bs]]))
            for lo in range(0, len(offline), bs)])  # fmt: skip
        self.mix = mix

    def sample(self, rng: np.random.Generator, n: int) -> dict:
        offline, b = self.mix.offline, self.mix.online
        n_on = self.mix.n_online(n)
        i, j = rng.integers(0, len(offline), n - n_on), rng.integers(0, len(b) or 1, n_on)
        o, nxt, ex = offline.obs_idx[i], offline.next_obs_idx[i], b.extras
        cat = lambda a, b_: np.concatenate([a, b_[j]])  # offline rows, then online rows
        out = {"head": cat(self.head[o], ex["head"]), "chunk": cat(self.chunk[i], ex["chunk"]),
               "next_head": cat(self.head[nxt], ex["next_head"]),
               "next_cand": cat(self.cand[nxt], ex["next_cand"])}  # fmt: skip
        out.update({k: cat(getattr(offline, k)[i], getattr(b, k)) for k in TD_KEYS})
        return out


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(agent: Agent):
    @partial(jax.jit, static_argnames="n")
    def act(state, obs, rng, n: int, beta: float):
        """Best of n chunks by mean − β·std (n = 1: plain π₀) -> env-unit chunk [B,H,A], critic mean there [B],
        and what the replay buffer caches for the critic: the head [B,W+S], the executed chunk [B,H,A] (normalised)."""
        prefix = agent.model.prefix(state["pi"], agent.io.observe(obs))
        a = agent.args
        chunk, q = agent.best_of_n(
            state["pi"], state["critic"], prefix, rng, n, a.flow_steps, beta, a.bon_slice if n == a.bon else 0
        )
        return agent.io.to_env(chunk, obs["state"]), q, agent.head(prefix), agent.io.executed(chunk)

    return act


def evaluate_both(act, state, args: Args, rng) -> dict:
    """One episode in each of --eval-episodes envs per policy: success, return and the critic's calibration (its value
    of the chunks it chose, eval/*q_pred, vs the discounted return that followed, eval/*q_realised)."""

    def ev(n: int, beta: float, prefix: str) -> dict:  # best of n chunks by mean − β·std
        policy = lambda obs, key: act(state, obs, key, n, beta)[:2]
        return envs.evaluate(args, policy, rng, args.eval_episodes, gamma=args.gamma, prefix=prefix)

    out = ev(args.bon, args.act_pessimism, "")  # best-of-N: the policy being trained
    out.update(ev(1, 0.0, "plain_"))  # plain π₀: what the critic adds is the difference
    if args.act_pessimism:  # and what the pessimism adds: ranking by the ensemble mean alone
        out.update(ev(args.bon, 0.0, "bon_mean_"))
    return out


def show(m: dict, n: int) -> str:
    f = lambda p: (f"{m[f'eval/{p}success_rate']:.1%} (Q pred {m[f'eval/{p}q_pred']:.3f} vs realised "
                   f"{m[f'eval/{p}q_realised']:.3f})")  # fmt: skip
    extra = [f"BoN by mean only {f('bon_mean_')}"] if "eval/bon_mean_success_rate" in m else []
    return " | ".join([f"BoN-{n} {f('')}", f"plain π₀ {f('plain_')}", *extra])


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args = resolve(args)
    mesh.init_distributed()
    dev_mesh = mesh.make_mesh(args.fsdp_devices)
    env = envs.from_args(args, args.num_envs, args.seed)
    if args.dataset is None and args.env != "push":
        raise ValueError(f"--env {args.env}: pass --dataset (prior data in robomimic/LIBERO HDF5 layout)")
    dataset = args.dataset or envs.default_dataset(env="push", noise=0.6, image_size=args.image_size)
    data = envs.load_dataset(dataset, args, env.prompts)  # HDF5 file/folder or LeRobot folder
    if data.actions.shape[1] != env.action_dim:
        raise ValueError(f"dataset actions have {data.actions.shape[1]} dims, env {args.env} has {env.action_dim}")
    offline = qchunk.make_chunks(data, args.action_horizon, args.gamma)
    H, H_m = args.action_horizon, args.model_horizon or args.action_horizon  # executed, π₀'s chunk
    if args.pi0_checkpoint:
        params, cfg, stats = runlog.load_pi0(args.pi0_checkpoint, action_horizon=H_m, asset_id=args.asset_id)
        params = {"pi": params}
    else:
        cams = tuple(pi0.CAMERAS[: len(env.camera_names)])
        shape = dict(action_dim=env.action_dim, state_dim=env.state_dim, action_horizon=H_m, cameras=cams)
        cfg, stats, params = pi0.make_config(args.pi0_preset, **shape), qchunk.norm_stats(data), None
    model, table = pi0.Pi0(cfg), pi0.make_prompt_table(data.prompts, pi0.make_tokenizer(args.tokenizer, cfg))
    delta = libero.openpi_delta_dims(stats) if args.pi0_checkpoint and args.env == "libero" else 0
    agent = Agent(args, model, pi0.EnvIO(cfg, table, stats, env.action_dim, delta, quantile=cfg.pi05, horizon=H))

    k_pi, k_c, k_run, k_cache = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    params = params or {"pi": model.init(k_pi)}
    x = jnp.zeros((1, cfg.vlm.width + (cfg.state_dim or cfg.action_dim) + H * env.action_dim))
    params["critic"] = jax.vmap(lambda k: agent.critic.init(k, x)["params"])(jax.random.split(k_c, args.num_qs))
    pi_tx, c_tx = make_tx(args, model, params["pi"])
    state = {**params, "target": jax.tree.map(jnp.copy, params["critic"])}
    state.update(opt_pi=pi_tx.init(params["pi"]), opt_c=c_tx.init(params["critic"]))
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))
    print(
        f"π₀ {pi0.param_count(state['pi']) / 1e6:.2f}M params, critic {args.num_qs}×"
        f"{pi0.param_count(state['critic']) / args.num_qs / 1e3:.0f}k, {len(offline)} offline chunks (H={H})"
    )

    where = dict(run_dir=args.run_dir, resume=args.resume, track=args.track, wandb_project=args.wandb_project)
    run = runlog.Run(args, "acrlpd_pi0", env=args.env, seed=args.seed, **where)
    buffer = qchunk.ReplayBuffer(args.buffer_size, H, args.gamma, env.reset(seed=args.seed)[0])
    step, buf_file = 0, os.path.join(run.dir, "buffer.npz")
    if args.resume and (restored := run.restore(state)) is not None:
        step, state, _ = restored
        buffer.load(buf_file)
        print(f"resumed {run.dir} at update {step} ({len(buffer)} online chunks)")

    def save(step):
        run.save(step, state, {"step": step, "norm_stats": stats})
        buffer.save(buf_file)

    (joint, critic_update), act, encode = make_updates(agent, pi_tx, c_tx), make_act(agent), jax.jit(agent.encode)
    np_rng = np.random.default_rng(args.seed + step)
    keys = ("obs", "next_obs", "actions", "valid", "return_to_go", *TD_KEYS)
    split = NamedSharding(dev_mesh, PartitionSpec(None, mesh.BATCH_AXES))  # [U,B,...]: B over the devices
    stack = lambda bs: jax.device_put(jax.tree.map(lambda *v: np.stack(v), *bs), split)  # n batches -> [n,B,...]

    total, results, info, obs = args.offline_steps + args.online_steps, {}, {}, env.reset(seed=args.seed)[0]
    for phase in ("offline", "online"):
        end = args.offline_steps if phase == "offline" else total
        t_phase, s_phase, ep_returns, warm = time.time(), step, [], 0
        if phase == "online" and step < end:  # π₀ is frozen from here: encode the prior data once
            cache = CriticData(agent, state["pi"], qchunk.MixedSampler(offline, buffer, args.online_fraction), k_cache)
            print(f"encoded {len(cache.head)} offline frames for the critic in {time.time() - t_phase:.0f}s")
        while step < end:
            k_act, k_upd, k_enc = jax.random.split(jax.random.fold_in(jax.random.fold_in(k_run, step), len(buffer)), 3)
            if phase == "offline":  # π₀ and critic together on prior data
                n = min(args.updates_per_call, end - step)
                bs = [{k: v for k, v in offline.sample(np_rng, args.batch_size).items() if k in keys} for _ in range(n)]
                state, info = joint(state, stack(bs), k_upd)
            else:  # one chunk in every env, cache what the critic reads, then --utd critic updates
                chunk, _, head, ex = act(state, obs, k_act, args.bon, args.act_pessimism)
                chunk = np.asarray(chunk)
                next_obs, cs = envs.execute_chunk(env, obs, chunk, args.gamma)
                next_head, next_cand = encode(state["pi"], cs.final_obs, k_enc)  # o_{t+H}, before any reset
                extras = {"head": head, "chunk": ex, "next_head": next_head, "next_cand": next_cand}
                buffer.add(obs, chunk, cs, extras=jax.device_get(extras))
                ep_returns += list(cs.success[cs.terminated | cs.truncated])
                obs, n = next_obs, min(args.utd, end - step) if len(buffer) >= args.learning_starts else 0
                if n:
                    bs = [cache.sample(np_rng, args.online_batch_size) for _ in range(n)]
                    state, info = critic_update(state, stack(bs), k_upd)
                elif (tenth := 10 * len(buffer) // args.learning_starts) > warm:  # warm-up: progress, buffer kept
                    buffer.save(buf_file)
                    print(f"[online] {len(buffer)}/{args.learning_starts} chunks before critic updates", flush=True)
                    warm = tenth
            prev, step = step, step + n
            if step // args.log_every > prev // args.log_every or step == end:
                m = {k: float(v) for k, v in jax.device_get(info).items()}
                m["charts/updates_per_s"] = (step - s_phase) / (time.time() - t_phase)
                if phase == "online" and ep_returns:
                    m["charts/online_success_rate"] = float(np.mean(ep_returns[-100:]))
                run.log(step, m)
                shown = {k.split("/")[1]: m[k] for k in ("losses/bc", "losses/critic", "charts/q_data") if k in m}
                run.progress(step, total, phase, s_phase, t_phase, **shown)
            if args.eval_every and step // args.eval_every > prev // args.eval_every and step != end:
                run.log(step, evaluate_both(act, state, args, jax.random.PRNGKey(step)))
            if step // args.save_every > prev // args.save_every:
                save(step)
        if step > s_phase:  # the phase ran: evaluate at its end
            rate = (step - s_phase) / max(time.time() - t_phase, 1e-9)
            m = evaluate_both(act, state, args, jax.random.PRNGKey(step))
            m[f"time/{phase}_updates_per_s"] = rate
            run.log(step, m)
            results.update({f"{phase}/{k}": v for k, v in m.items()})
            results.update({f"final/{k}": v for k, v in m.items()})
            print(f"[{phase} done, update {step}, {rate:.1f} updates/s] " + show(m, args.bon), flush=True)
    save(step)
    env.close()
    run.close()
    results.update({"step": step, "run_dir": run.dir, **{k: float(v) for k, v in jax.device_get(info).items()}})
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
