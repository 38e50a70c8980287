"""Offline chunk-level advantage-weighted regression (AWR) on π₀: each action chunk is one decision.

Method (Peng et al., "Advantage-Weighted Regression", 2019; IQL's expectile value, Kostrikov et al., 2021; on
H-step action chunks as in Li, Zhou and Levine, "Reinforcement Learning with Action Chunking", 2025):
  chunk reward   r_t = Σ_{k<H} γ^k r_{t+k} (--reward return), or max over the chunk's valid steps of the sub-goal
                 flags (--reward subgoal, as in chunk-level offline RL for LIBERO)
  critic         L_Q = E[(Q_θ(x_t, A_t) − y_t)²],  y_t = r_t + γ^n (1 − done) V_ψ(x_{t+H})   (n valid steps, sg)
  value          L_V = E[(V_ψ(x_t) − E_{A∼π}[Q̄(x_t, A) − α log π(A|x_t)])²] with M chunks from one prefix pass
                 (--value-loss sampled; log π by the flow's change of variables), or IQL's expectile of Q̄(x_t, A_t)
                 (--value-loss expectile, the default: ~2.5× cheaper and it never queries π₀ off the data)
  policy         L_π = Σ w_t Σ_h valid·ℓ_flow / Σ w_t Σ_h valid,  w_t = min(exp(β (Q̄ − V)), --max-weight)  (sg on w)
  Q̄ is the min of two Polyak-averaged target heads. Q and V read [sg(π₀ prefix features), state]; the policy is π₀.
Schedules: --schedule two-phase (default) trains Q and V first on the frozen initial π₀'s features, computes the
advantage of every dataset chunk once, then trains π₀ by weighted flow matching at BC speed (by default the
weights pick the chunks, P(i) ∝ w_i, and the loss gets w ≡ 1: the same objective with a full effective batch;
--weighting loss weights the loss instead); --schedule joint
minimises L = L_Q + λ_V L_V + λ_π L_π every step. A prototype on push found the joint form ~3× slower per update and
no better than BC within a few minutes, the two-phase form 10+ points above BC, hence the default.
--beta 0 gives w ≡ 1 exactly: plain behaviour cloning through the same update (the benchmark's baseline; the
critic phase is then skipped, since nothing reads it).

  python chunk_awr.py                                    # push, mixed-quality demos, CPU π₀ preset, < 10 min
  python chunk_awr.py --env libero --dataset DIR --pi0-checkpoint CKPT --tokenizer TOK   # GPUs
  python chunk_awr.py --critic-steps 20 --policy-steps 10 --episodes 30 --eval-episodes 4 --batch-size 8   # smoke
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
import tyro

from common import envs, libero, mesh, pi0, qchunk, runlog

HORIZONS = {"push": 5, "libero": 10}  # default chunk length H by --env (substring match); others: 5


@dataclass
class Args(runlog.RunArgs):
    exp_name: str = "chunk_awr"
    """name of this experiment (run folder and wandb)"""
    dataset: str | None = None
    """offline data: robomimic/LIBERO HDF5 (file or folder) or a LeRobot folder; push default: mixed demos (.3/.6/1)"""
    save_every: int = 2000
    """checkpoint every this many updates (and at the end)"""
    log_every: int = 200
    """log losses every this many updates"""
    eval_every: int = 2000
    """evaluate every this many policy updates (0: only at the end of each phase)"""
    eval_episodes: int = 100
    """episodes per evaluation"""
    num_envs: int = 100
    """parallel evaluation environments (eval_episodes are spread over them)"""

    asset_id: str | None = None
    """norm-stats asset of the checkpoint (e.g. physical-intelligence/libero)"""
    action_horizon: int | None = None
    """H, the chunk length (push 5, libero 10)"""
    episodes: int = 1500
    """default push dataset size (split evenly over noise 0.3/0.6/1.0)"""
    flow_steps: int = 4
    """Euler steps when acting (a prototype: 4 beat 5 and 10 for flow BC on push)"""
    eval_noise: float = 0.0
    """scale of the initial flow noise at evaluation (0: the deterministic policy)"""

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
    """updates per jitted call (lax.scan)"""
    gamma: float = 0.99
    """per-step discount"""
    lr: float = 3e-4
    """π₀ learning rate"""
    critic_lr: float = 3e-4
    """Q and V learning rate"""
    critic_hidden: tuple[int, ...] = (256, 256)
    """Q and V MLP widths"""
    tau: float = 0.005
    """Polyak rate of the target Q heads"""
    critic_target: Literal["mc", "td"] = "mc"
    """y of L_Q: mc (the discounted return to the episode's end: Q of the data's policy by regression, no bootstrap
    lag, as one-step AWR) or td (r_t + γ^H (1 − done) V(x_{t+H}); 16 chunk backups on push need more critic steps)"""
    reward: Literal["return", "subgoal"] = "return"
    """chunk reward: return (in-chunk discounted return) or subgoal (max of the per-step sub-goal flags)"""
    value_loss: Literal["expectile", "sampled"] = "expectile"
    """expectile (IQL on data chunks) or sampled (E over M π₀ chunks of Q̄ − α log π)"""
    expectile: float = 0.7
    """τ of the expectile value loss"""
    num_samples: int = 8
    """M: π₀ chunks per observation for the sampled value loss"""
    value_flow_steps: int = 4
    """Euler steps for those chunks"""
    alpha: float = 0.0
    """entropy weight α of the sampled value target (needs log π: divergence along the flow)"""
    hutchinson_above: int = 32
    """log π: exact Jacobian trace when H·A ≤ this, else Hutchinson's estimator"""
    beta: float = 20.0
    """inverse temperature β of w = exp(β A); 0 = plain BC"""
    max_weight: float = 100.0
    """clip of the weights"""
    weighting: Literal["sample", "loss"] = "sample"
    """two-phase: sample chunks with probability ∝ w and give the loss w ≡ 1 (the same objective in expectation,
    a full effective batch: with β=20 the weights' effective sample size is ~12% of a batch), or weight the loss"""
    weight_norm: Literal["batch", "none"] = "batch"
    """batch: divide the weighted loss by Σ w·valid (self-normalised); none: by Σ valid"""
    lambda_v: float = 1.0
    """λ_V (joint schedule)"""
    lambda_pi: float = 1.0
    """λ_π (joint schedule)"""


def check(args: Args) -> Args:
    runlog.check_choices(args)
    if args.beta < 0 or args.max_weight <= 0:
        raise ValueError("--beta must be ≥ 0 and --max-weight > 0")
    if args.alpha < 0 or (args.alpha > 0 and args.value_loss != "sampled"):
        raise ValueError("--alpha > 0 needs --value-loss sampled (log π of π₀'s own chunks)")
    if args.action_horizon is None:
        h = next((v for k, v in HORIZONS.items() if k in args.env.lower()), 5)
        args = dataclasses.replace(args, action_horizon=h)
    return args


# ----------------------------------------------------------------------------------------------------- networks
class MLP(nn.Module):
    """Dense → LayerNorm → GELU blocks, `out` outputs (2 = a Q pair, 1 = V)."""

    hidden: tuple[int, ...]
    out: int

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.gelu(nn.LayerNorm()(nn.Dense(h)(x)))
        return nn.Dense(self.out)(x)


class Heads:
    """Q(x, A) (two heads) and V(x) on [sg(features) [B,W], normalised state [B,S], normalised chunk [B,H·A]]."""

    def __init__(self, hidden):
        self.q, self.v = MLP(hidden, 2), MLP(hidden, 1)

    def init(self, rng, w: int, s: int, ha: int):
        kq, kv = jax.random.split(rng)
        q, v = self.q.init(kq, jnp.zeros((1, w + s + ha))), self.v.init(kv, jnp.zeros((1, w + s)))
        return {"q": q["params"], "v": v["params"]}

    def qs(self, qp, feats, state, chunks):  # chunks [B,...,H,A] -> [B,...,2]
        lead, ctx = chunks.shape[:-2], jnp.concatenate([feats, state], -1)  # ctx [B,W+S], the same for every chunk
        ctx = jnp.broadcast_to(jnp.expand_dims(ctx, tuple(range(1, len(lead)))), lead + ctx.shape[-1:])
        x = jnp.concatenate([jax.lax.stop_gradient(ctx), chunks.reshape(*lead, -1)], -1)
        return self.q.apply({"params": qp}, x)

    def value(self, vp, feats, state):  # -> [B]
        return self.v.apply({"params": vp}, jax.lax.stop_gradient(jnp.concatenate([feats, state], -1)))[..., 0]


# ----------------------------------------------------------------------------------------------------- losses
def chunk_reward(batch, kind: str):
    """r_t per chunk [B]: the in-chunk discounted return, or 1 if a valid step of the chunk completes a sub-goal."""
    if kind == "subgoal":
        return batch["subgoal"].astype(jnp.float32)  # qchunk: (per-step flag & valid).any over the chunk
    return batch["discounted_return"].astype(jnp.float32)


def awr_weights(adv, beta: float, max_weight: float):
    """w = min(exp(β A), max_weight), stop-gradient. β = 0 gives exactly 1."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(beta * adv), max_weight))


def policy_loss(model: pi0.Pi0, params, prefix_or_obs, actions, valid, w, rng, weight_norm: str = "batch"):
    """Advantage-weighted flow matching: Σ_b w_b Σ_h valid·ℓ_bh / normaliser. w ≡ 1 is the BC flow loss."""
    per_step = model.flow_loss(params, prefix_or_obs, actions, rng)  # [B,H]
    m = valid.astype(jnp.float32) * w[:, None]
    denom = m.sum() if weight_norm == "batch" else valid.astype(jnp.float32).sum()
    return (per_step * m).sum() / jnp.maximum(denom, 1e-6), per_step


def sample_logp(model: pi0.Pi0, params, prefix, noise, steps: int, rng, hutchinson: bool):
    """Euler t=1→0 with log π by the change of variables: log π(A) = log N(x_1) + (1/K) Σ_k tr ∂v/∂x (x_k, t_k).

    noise [B,N,H,A] -> (A [B,N,H,A], log π [B,N]). Exact trace: one JVP per coordinate (rows never interact);
    Hutchinson: E[εᵀ J ε] with Rademacher ε.
    """
    B, N, H, A = noise.shape
    dt = -1.0 / steps

    def step(carry, key):
        x, t, tr_sum = carry
        f = lambda y: model.velocity(params, prefix, y, jnp.full((B, N), t))[0]  # noqa: E731
        if hutchinson:
            eps = jax.random.rademacher(key, x.shape, jnp.float32)
            v, jv = jax.jvp(f, (x,), (eps,))
            tr = (eps * jv).sum((-2, -1))
        else:
            basis = jnp.eye(H * A, dtype=jnp.float32).reshape(H * A, H, A)
            v, jv = jax.vmap(lambda e: jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),)))(basis)  # [HA,B,N,H,A]
            v, tr = v[0], jnp.einsum("dbnha,dha->bn", jv, basis)
        return (x + dt * v, t + dt, tr_sum + tr), None

    keys = jax.random.split(rng, steps)
    (x, _, tr_sum), _ = jax.lax.scan(step, (noise, jnp.float32(1.0), jnp.zeros((B, N))), keys)
    log_n = -0.5 * (noise**2).sum((-2, -1)) - 0.5 * H * A * math.log(2 * math.pi)
    return x, log_n + tr_sum / steps


def critic_loss(args: Args, heads: Heads, hp, feats, state, chunks, next_feats, next_state, batch, value_target):
    """L_Q + λ_V L_V. value_target: [B] E_π[Q̄ − α log π] (sampled) or None (expectile on the data chunk)."""
    if args.critic_target == "mc":  # G_t = Σ_{k≥0} γ^k r_{t+k} to the episode's end (0 after a truncation)
        y = batch["return_to_go"]
    else:
        v_next = jax.lax.stop_gradient(heads.value(hp["v"], next_feats, next_state))
        y = jax.lax.stop_gradient(chunk_reward(batch, args.reward) + batch["discount"] * batch["mask"] * v_next)
    q = heads.qs(hp["q"], feats, state, chunks)  # [B,2]
    loss_q = jnp.mean(jnp.square(q - y[:, None]))
    v = heads.value(hp["v"], feats, state)
    if value_target is None:  # IQL expectile of the target Q pair's min on the data chunk
        diff = jax.lax.stop_gradient(heads.qs(hp["q_target"], feats, state, chunks).min(-1)) - v
        loss_v = jnp.mean(jnp.abs(args.expectile - (diff < 0).astype(jnp.float32)) * jnp.square(diff))
    else:
        loss_v = jnp.mean(jnp.square(v - jax.lax.stop_gradient(value_target)))
    info = {"losses/q": loss_q, "losses/v": loss_v, "charts/q": q.mean(), "charts/v": v.mean(), "charts/y": y.mean()}
    return loss_q + args.lambda_v * loss_v, info


# ----------------------------------------------------------------------------------------------------- update
class Learner:
    """Model, heads, optimisers and the observation/action plumbing (`io`), closed over by the jitted functions."""

    def __init__(self, args: Args, model: pi0.Pi0, io: pi0.EnvIO):
        self.args, self.model, self.io = args, model, io
        self.heads = Heads(tuple(args.critic_hidden))
        self.pi_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=1e-4))
        self.h_tx = optax.adam(args.critic_lr)

    def encode(self, params, obs):  # one VLM pass without gradients -> (features [B,W], normalised state [B,S])
        prefix = jax.lax.stop_gradient(self.model.prefix(params, self.io.observe(obs)))
        return prefix.features, prefix.state

    def value_target(self, params, hp, prefix, rng):
        """E over M π₀ chunks of min Q̄ − α log π, from the given prefix (all stop-gradient)."""
        a, c = self.args, self.model.config
        k_noise, k_tr = jax.random.split(rng)
        params, prefix = jax.lax.stop_gradient((params, prefix))
        noise = jax.random.normal(k_noise, (prefix.features.shape[0], a.num_samples, c.action_horizon, c.action_dim))
        if a.alpha > 0:
            hutchinson = c.action_horizon * c.action_dim > a.hutchinson_above
            chunks, logp = sample_logp(self.model, params, prefix, noise, a.value_flow_steps, k_tr, hutchinson)
        else:
            chunks, logp = self.model.sample(params, prefix, noise, a.value_flow_steps), 0.0
        q = self.heads.qs(hp["q_target"], prefix.features, prefix.state, self.io.executed(chunks)).min(-1)  # [B,M]
        return jax.lax.stop_gradient(jnp.mean(q - a.alpha * logp, axis=1))

    def step(self, state, batch, rng, phase: str):
        """One update. phase: critic (two-phase 1), policy (two-phase 2) or joint."""
        a = self.args
        k_pi, k_v = jax.random.split(rng)
        chunks = self.io.executed(self.io.to_model(batch["actions"]))  # [B,H,A] normalised (absolute) data chunks
        hp = {"q": state["q"], "v": state["v"], "q_target": state["q_target"]}

        def loss_fn(params, hp):
            info, total = {}, 0.0
            next_feats = next_s = None  # x_{t+H}: only the TD target reads it
            if phase == "critic" and "features" in batch:  # frozen π₀: features precomputed once per frame
                prefix, feats, s = None, batch["features"], batch["state_n"]
                next_feats, next_s = batch.get("next_features"), batch.get("next_state_n")
            else:
                prefix = self.model.prefix(params, self.io.observe(batch["obs"]))
                feats, s = jax.lax.stop_gradient(prefix.features), jax.lax.stop_gradient(prefix.state)
                if phase != "policy" and a.critic_target == "td":
                    next_feats, next_s = self.encode(jax.lax.stop_gradient(params), batch["next_obs"])
            if phase in ("critic", "joint"):
                vt = self.value_target(params, hp, prefix, k_v) if a.value_loss == "sampled" else None
                l_c, info = critic_loss(a, self.heads, hp, feats, s, chunks, next_feats, next_s, batch, vt)
                total = total + l_c
            if phase in ("policy", "joint"):
                if phase == "joint":  # advantage from the current heads on this batch
                    q = self.heads.qs(hp["q_target"], feats, s, chunks).min(-1)
                    adv = q - self.heads.value(hp["v"], feats, s)
                else:  # from the table computed after the critic phase
                    adv = batch["adv"]
                w = awr_weights(adv, a.beta, a.max_weight)
                target = self.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m]; delta: − state
                valid = self.io.step_weights(batch["valid"])  # [B,H_m], 0 on steps π₀ predicts but never executes
                l_pi, _ = policy_loss(self.model, params, prefix, target, valid, w, k_pi, a.weight_norm)
                total = total + a.lambda_pi * l_pi if phase == "joint" else total + l_pi
                info["losses/policy"], info["charts/adv_std"] = l_pi, adv.std()
                info["charts/weight_mean"], info["charts/weight_max"] = w.mean(), w.max()
            return total, info

        train_pi, train_h = phase in ("policy", "joint"), phase in ("critic", "joint")
        if train_pi and train_h:
            (_, info), (g_pi, g_h) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state["params"], hp)
        elif train_pi:
            (_, info), g_pi = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], hp)
        else:
            (_, info), g_h = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(state["params"], hp)
        new = dict(state)
        if train_pi:
            upd, new["opt"] = self.pi_tx.update(g_pi, state["opt"], state["params"])
            new["params"] = optax.apply_updates(state["params"], upd)
            info["charts/grad_norm"] = optax.tree.norm(g_pi)
        if train_h:
            qv = {"q": state["q"], "v": state["v"]}
            upd, new["h_opt"] = self.h_tx.update({"q": g_h["q"], "v": g_h["v"]}, state["h_opt"], qv)
            new.update(optax.apply_updates(qv, upd))
            new["q_target"] = optax.incremental_update(new["q"], state["q_target"], a.tau)
        return new, info

    def make_advantage(self):
        """A = min Q̄(x, A_data) − V(x) for a batch of precomputed features (after the critic phase)."""

        @jax.jit
        def advantage(state, feats, s, actions):
            chunks = self.io.executed(self.io.to_model(actions))
            q = self.heads.qs(state["q_target"], feats, s, chunks).min(-1)
            return q - self.heads.value(state["v"], feats, s)

        return advantage

    def make_act(self):
        @jax.jit
        def act(params, obs, rng):  # -> actions [E,H,A] in env units
            B, c = obs["state"].shape[0], self.model.config
            prefix = self.model.prefix(params, self.io.observe(obs))
            noise = self.args.eval_noise * jax.random.normal(rng, (B, 1, c.action_horizon, c.action_dim))
            return self.io.to_env(self.model.sample(params, prefix, noise, self.args.flow_steps)[:, 0], obs["state"])

        return act


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args = check(args)
    mesh.init_distributed()
    run = runlog.Run.from_args(args, "chunk_awr")
    env = envs.from_args(args, 1, args.seed)
    env.close()  # only its spaces, cameras and prompts are needed here
    if args.dataset is None and args.env != "push":
        raise ValueError(f"--env {args.env}: pass --dataset (HDF5 file or folder); only push has a default dataset")
    path = args.dataset or envs.default_dataset(env="push", noise="mixed", episodes=args.episodes)
    data = envs.load_dataset(path, args, env.prompts)
    chunks, stats = qchunk.make_chunks(data, args.action_horizon, args.gamma), qchunk.norm_stats(data)
    print(f"{len(data.episode_lengths)} episodes, {len(chunks)} chunks of H={args.action_horizon} from {path}")

    H, A, H_m = args.action_horizon, env.action_dim, args.model_horizon or args.action_horizon  # executed, π₀'s
    if args.pi0_checkpoint:
        params, cfg, stats = runlog.load_pi0(args.pi0_checkpoint, action_horizon=H_m, asset_id=args.asset_id)
    else:
        cams = tuple(env.camera_names)
        cfg = pi0.make_config(args.pi0_preset, action_dim=A, state_dim=env.state_dim, action_horizon=H_m, cameras=cams)
        params = pi0.Pi0(cfg).init(jax.random.key(args.seed))
    model, table = pi0.Pi0(cfg), pi0.make_prompt_table(data.prompts, pi0.make_tokenizer(args.tokenizer, cfg))
    delta = libero.openpi_delta_dims(stats) if args.pi0_checkpoint and args.env == "libero" else 0
    learner = Learner(args, model, pi0.EnvIO(cfg, table, stats, A, delta, quantile=cfg.pi05, horizon=H))
    m = mesh.make_mesh(args.fsdp_devices)
    hp = learner.heads.init(jax.random.key(args.seed + 1), cfg.vlm.width, cfg.state_dim or cfg.action_dim, H * A)
    heads = {"q": hp["q"], "v": hp["v"], "q_target": jax.tree.map(jnp.copy, hp["q"]), "h_opt": learner.h_tx.init(hp)}
    state = {"params": params, "opt": learner.pi_tx.init(params), **heads, "adv": jnp.zeros(len(chunks), jnp.float32)}
    state["rng"] = jax.random.PRNGKey(args.seed)
    replicated = lambda tree: jax.tree.map(lambda _: mesh.replicated(m), tree)  # the heads: small, on every device
    shardings = {k: mesh.fsdp_sharding(v, m) if k in ("params", "opt") else replicated(v) for k, v in state.items()}
    state = jax.device_put(state, shardings)
    critic_steps = args.critic_steps if args.schedule == "two-phase" and args.beta > 0 else 0
    total, step = critic_steps + args.policy_steps, 0
    if args.resume and (restored := run.restore(state)) is not None:
        step, state = restored[0], jax.device_put(restored[1], shardings)
        print(f"resumed at step {step}")

    def save(step):
        run.save(step, state, {"norm_stats": stats, "step": step, "critic_steps": critic_steps})

    np_rng, act = np.random.default_rng(args.seed + step), learner.make_act()
    phase_of = "joint" if args.schedule == "joint" else "policy"
    # update(state, batches [K,B,...], rng) -> (state, info averaged over K): K updates in one lax.scan
    updates = {p: mesh.scan_updates(partial(learner.step, phase=p), shardings) for p in ("critic", phase_of)}
    feats, cdf, train_s, result, last_eval = None, None, 0.0, {}, -1

    def do_eval(step):  # the policy from one noise draw (scaled by --eval-noise), episodes spread over --num-envs
        nonlocal result, last_eval
        last_eval, t, rng = step, time.time(), jax.random.fold_in(jax.random.key(args.seed), step)
        policy = lambda obs, key: (act(state["params"], obs, key), None)
        result = envs.evaluate(args, policy, rng, args.eval_episodes, args.num_envs, args.gamma)
        result.update({"time/train_s": train_s, "time/eval_s": time.time() - t})
        run.log(step, result)
        msg = f"[eval] step {step}: success {result['eval/success_rate']:.2f}  return {result['eval/return']:.3f}  "
        print(msg + f"(train {train_s:.0f}s, eval {result['time/eval_s']:.1f}s)", flush=True)

    def encode_all(params):  # features of every frame with the frozen initial π₀ (critic phase)
        enc, n = jax.jit(learner.encode), len(data)
        frames = [np.arange(lo, min(lo + 4096, n)) for lo in range(0, n, 4096)]
        out = [jax.device_get(enc(params, qchunk.gather_obs(data.obs, i))) for i in frames]  # [(features, state)]
        return np.concatenate([f for f, _ in out]), np.concatenate([s for _, s in out])

    def batches(n, bsize, phase):  # n batches stacked [n,B,...]
        rows = []
        for _ in range(n):
            if phase == "policy" and cdf is not None:  # weighted sampling: P(i) ∝ w_i (inverse CDF)
                i = np.minimum(np.searchsorted(cdf, np_rng.uniform(0, cdf[-1], bsize)), len(chunks) - 1)
            else:
                i = np_rng.integers(0, len(chunks), bsize)
            b = chunks.get(i)
            b.pop("rewards")
            if phase == "policy" or args.critic_target != "td":  # o_{t+H} is read by the TD target only
                b.pop("next_obs")
            if phase == "critic" and feats is not None:
                (f, s), oi, ni = feats, chunks.obs_idx[i], chunks.next_obs_idx[i]
                b.update(features=f[oi], state_n=s[oi]), b.pop("obs")
                if args.critic_target == "td":
                    b.update(next_features=f[ni], next_state_n=s[ni]), b.pop("next_obs")
            if phase == "policy":
                b["adv"] = adv_table[i] if cdf is None else np.zeros(bsize, np.float32)  # sampled: w = exp(0) = 1
            rows.append(b)
        return jax.tree.map(lambda *x: np.stack(x), *rows)

    t_start = time.time()
    if step < critic_steps:  # ---- phase 1: Q and V on the frozen initial π₀'s features
        if args.value_loss == "expectile":
            t = time.time()
            feats = encode_all(state["params"])
            print(f"[critic] features of {len(data)} frames in {time.time() - t:.1f}s")
        t0, s0 = time.time(), step
        while step < critic_steps:
            k = min(args.updates_per_call * 5, critic_steps - step)
            state["rng"], key = jax.random.split(state["rng"])
            state, info = updates["critic"](state, batches(k, args.critic_batch_size, "critic"), key)
            step += k
            if step % args.log_every < k or step == critic_steps:
                run.log(step, info)
                run.progress(step, total, "critic", s0, t0, q=float(info["losses/q"]), v=float(info["losses/v"]))
        # the advantage of every dataset chunk, once: A = min Q̄ − V
        feats = feats if feats is not None else encode_all(state["params"])
        adv_fn, advs = learner.make_advantage(), []
        for i in chunks.all_indices(8192):
            oi = chunks.obs_idx[i]
            advs.append(np.asarray(adv_fn(state, feats[0][oi], feats[1][oi], data.actions[chunks.action_idx[i]])))
        state["adv"] = jax.device_put(np.concatenate(advs), shardings["adv"])
        feats = None
        w = np.minimum(np.exp(args.beta * np.asarray(state["adv"])), args.max_weight)
        clipped = (w >= args.max_weight).mean()
        print(f"[critic] advantage std {np.std(state['adv']):.4f}; weights mean {w.mean():.3g}, clipped {clipped:.1%}")
        train_s += time.time() - t_start
        save(step)
    adv_table = np.asarray(state["adv"])
    cdf = None  # two-phase weighted sampling (β = 0: uniform, the plain BC sampler)
    if args.weighting == "sample" and args.beta > 0 and args.schedule == "two-phase":
        cdf = np.cumsum(np.minimum(np.exp(args.beta * adv_table.astype(np.float64)), args.max_weight))
    if step == critic_steps and args.eval_every >= 0:
        do_eval(step)

    # ---- phase 2 (or the joint schedule): π₀ trained by advantage-weighted flow matching
    t0, s0, pol_s = time.time(), step, 0.0
    while step < total and not (args.time_budget_s and train_s >= args.time_budget_s):
        t, k = time.time(), min(args.updates_per_call, total - step)
        state["rng"], key = jax.random.split(state["rng"])
        state, info = updates[phase_of](state, batches(k, args.batch_size, phase_of), key)
        step += k
        if step % args.log_every < k:
            run.log(step, info)
            run.progress(step, total, phase_of, s0, t0, policy=float(info["losses/policy"]))
        train_s, pol_s = train_s + time.time() - t, pol_s + time.time() - t
        if step % args.save_every < k:
            save(step)
        if args.eval_every and (step - critic_steps) % args.eval_every < k:
            do_eval(step)
    save(step)
    if last_eval != step:  # the final evaluation, unless one just ran
        do_eval(step)
    run.close()
    out = {**result, "step": step, "policy_updates": step - critic_steps, "run_dir": run.dir, "time/train_s": train_s}
    return {**out, "time/policy_updates_per_s": (step - s0) / max(pol_s, 1e-9)}


if __name__ == "__main__":
    main(tyro.cli(Args))
