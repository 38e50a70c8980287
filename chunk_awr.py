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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from common import envs, libero, mesh, pi0, qchunk, runlog

HORIZONS = {"push": 5, "libero": 10}  # default chunk length H by --env (substring match); others: 5


@dataclass
class Args:
    exp_name: str = "chunk_awr"
    """name of this experiment (run folder and wandb)"""
    seed: int = 1
    """random seed (parameters, data order, environments)"""
    env: str = "push"
    """'push' (embedded), 'libero', or any gymnasium id (evaluation env)"""
    env_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)
    """environment options as KEY VALUE pairs, JSON values (libero: suite, task_ids, image_size, max_episode_steps)"""
    dataset: str | None = None
    """offline data: HDF5 file or folder (robomimic/LIBERO layout); default for push: mixed demos (noise .3/.6/1)"""
    pi0_checkpoint: str | None = None
    """openpi checkpoint directory (params + assets/norm stats); None: the --pi0-preset trained from scratch"""
    pi0_preset: str = "cpu"
    """π₀ size when no checkpoint is given: cpu, pi0, pi05"""
    tokenizer: str | None = None
    """path of paligemma_tokenizer.model; None: the built-in word tokenizer (CPU preset)"""
    track: bool = False
    """log to wandb (WANDB_MODE=offline works without network)"""
    wandb_project: str = "pi0-rl"
    """wandb project"""
    run_dir: str | None = None
    """run folder; default runs/<env>__chunk_awr__<seed>__<time>"""
    resume: bool = False
    """continue from the last checkpoint in --run-dir"""
    fsdp_devices: int = 1
    """devices the parameters are sharded over (FSDP); the batch is split over all devices"""
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

    schedule: str = "two-phase"
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
    critic_target: str = "mc"
    """y of L_Q: mc (the discounted return to the episode's end: Q of the data's policy by regression, no bootstrap
    lag, as one-step AWR) or td (r_t + γ^H (1 − done) V(x_{t+H}); 16 chunk backups on push need more critic steps)"""
    reward: str = "return"
    """chunk reward: return (in-chunk discounted return) or subgoal (max of the per-step sub-goal flags)"""
    value_loss: str = "expectile"
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
    weighting: str = "sample"
    """two-phase: sample chunks with probability ∝ w and give the loss w ≡ 1 (the same objective in expectation,
    a full effective batch: with β=20 the weights' effective sample size is ~12% of a batch), or weight the loss"""
    weight_norm: str = "batch"
    """batch: divide the weighted loss by Σ w·valid (self-normalised); none: by Σ valid"""
    lambda_v: float = 1.0
    """λ_V (joint schedule)"""
    lambda_pi: float = 1.0
    """λ_π (joint schedule)"""


def check(args: Args) -> Args:
    for name, val, ok in (
        ("schedule", args.schedule, ("two-phase", "joint")),
        ("reward", args.reward, ("return", "subgoal")),
        ("critic-target", args.critic_target, ("mc", "td")),
        ("value-loss", args.value_loss, ("expectile", "sampled")),
        ("weight-norm", args.weight_norm, ("batch", "none")),
        ("weighting", args.weighting, ("sample", "loss")),
    ):
        if val not in ok:
            raise ValueError(f"--{name} {val!r}: choose one of {ok}")
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
        return {
            "q": self.q.init(kq, jnp.zeros((1, w + s + ha)))["params"],
            "v": self.v.init(kv, jnp.zeros((1, w + s)))["params"],
        }

    def qs(self, qp, feats, state, chunks):  # chunks [B,...,H,A] -> [B,...,2]
        lead = chunks.shape[:-2]
        ctx = jnp.concatenate([feats, state], -1)
        ctx = jnp.broadcast_to(
            ctx.reshape(ctx.shape[:1] + (1,) * (len(lead) - 1) + ctx.shape[1:]), lead + ctx.shape[-1:]
        )
        return self.q.apply(
            {"params": qp}, jnp.concatenate([jax.lax.stop_gradient(ctx), chunks.reshape(*lead, -1)], -1)
        )

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


def critic_loss(
    args: Args, heads: Heads, hp, q_target, feats, state, chunks, next_feats, next_state, batch, value_target
):
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
        diff = jax.lax.stop_gradient(heads.qs(q_target, feats, state, chunks).min(-1)) - v
        loss_v = jnp.mean(jnp.abs(args.expectile - (diff < 0).astype(jnp.float32)) * jnp.square(diff))
    else:
        loss_v = jnp.mean(jnp.square(v - jax.lax.stop_gradient(value_target)))
    info = {"losses/q": loss_q, "losses/v": loss_v, "charts/q": q.mean(), "charts/v": v.mean(), "charts/y": y.mean()}
    return loss_q + args.lambda_v * loss_v, info


# ----------------------------------------------------------------------------------------------------- update
class Learner:
    """Model, heads, optimisers and the observation/action plumbing, closed over by the jitted functions."""

    def __init__(self, args: Args, model: pi0.Pi0, table, stats: dict, env_action_dim: int):
        self.args, self.model, self.table, self.A = args, model, table, env_action_dim
        self.stats = jax.tree.map(jnp.asarray, stats)
        self.heads = Heads(tuple(args.critic_hidden))
        self.delta = libero.openpi_delta_dims(stats) if args.pi0_checkpoint and args.env == "libero" else 0
        self.pi_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=1e-4))
        self.h_tx = optax.adam(args.critic_lr)

    def observe(self, obs):
        return pi0.make_observation(self.model.config, obs, self.table, self.stats["state"])

    def norm_actions(self, a, state=None):  # env units [..., A] -> normalised, zero-padded to the model's action dim
        """With `state` (the policy's targets): relative to it where the checkpoint predicts that (`self.delta`)."""
        off = 0.0 if state is None else libero.state_offset(state, self.A, self.delta)
        a = pi0.normalize(a - off, self.stats["actions"])
        return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, self.model.config.action_dim - a.shape[-1])])

    def encode(self, params, obs):  # one VLM pass without gradients -> (features [B,W], normalised state [B,S])
        prefix = jax.lax.stop_gradient(self.model.prefix(params, self.observe(obs)))
        return prefix.features, prefix.state

    def value_target(self, params, hp, prefix, rng):
        """E over M π₀ chunks of min Q̄ − α log π, from the given prefix (all stop-gradient)."""
        a = self.args
        c = self.model.config
        k_noise, k_tr = jax.random.split(rng)
        params, prefix = jax.lax.stop_gradient((params, prefix))
        noise = jax.random.normal(k_noise, (prefix.features.shape[0], a.num_samples, c.action_horizon, c.action_dim))
        if a.alpha > 0:
            hutchinson = c.action_horizon * c.action_dim > a.hutchinson_above
            chunks, logp = sample_logp(self.model, params, prefix, noise, a.value_flow_steps, k_tr, hutchinson)
        else:
            chunks, logp = self.model.sample(params, prefix, noise, a.value_flow_steps), 0.0
        q = self.heads.qs(hp["q_target"], prefix.features, prefix.state, chunks[..., : self.A]).min(-1)  # [B,M]
        return jax.lax.stop_gradient(jnp.mean(q - a.alpha * logp, axis=1))

    def step(self, state, batch, rng, phase: str):
        """One update. phase: critic (two-phase 1), policy (two-phase 2) or joint."""
        a = self.args
        k_pi, k_v = jax.random.split(rng)
        chunks = self.norm_actions(batch["actions"])  # [B,H,A_m]
        hp = {"q": state["q"], "v": state["v"], "q_target": state["q_target"]}

        def loss_fn(params, hp):
            info, total = {}, 0.0
            if phase == "critic" and "features" in batch:  # frozen π₀: features precomputed once per frame
                prefix, feats, s = None, batch["features"], batch["state_n"]
                next_feats, next_s = batch["next_features"], batch["next_state_n"]
            else:
                prefix = self.model.prefix(params, self.observe(batch["obs"]))
                feats, s = jax.lax.stop_gradient(prefix.features), jax.lax.stop_gradient(prefix.state)
                if phase != "policy":
                    next_feats, next_s = self.encode(jax.lax.stop_gradient(params), batch["next_obs"])
            if phase in ("critic", "joint"):
                vt = self.value_target(params, hp, prefix, k_v) if a.value_loss == "sampled" else None
                l_c, info = critic_loss(
                    a, self.heads, hp, hp["q_target"], feats, s, chunks[..., : self.A], next_feats, next_s, batch, vt
                )
                total = total + l_c
            if phase in ("policy", "joint"):
                if phase == "joint":  # advantage from the current heads on this batch
                    q = self.heads.qs(hp["q_target"], feats, s, chunks[..., : self.A]).min(-1)
                    adv = q - self.heads.value(hp["v"], feats, s)
                else:  # from the table computed after the critic phase
                    adv = batch["adv"]
                w = awr_weights(adv, a.beta, a.max_weight)
                target = self.norm_actions(batch["actions"], batch["obs"]["state"])  # = chunks unless self.delta
                l_pi, _ = policy_loss(self.model, params, prefix, target, batch["valid"], w, k_pi, a.weight_norm)
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
            g = {"q": g_h["q"], "v": g_h["v"]}
            upd, new["h_opt"] = self.h_tx.update(g, state["h_opt"], {"q": state["q"], "v": state["v"]})
            heads = optax.apply_updates({"q": state["q"], "v": state["v"]}, upd)
            new["q"], new["v"] = heads["q"], heads["v"]
            new["q_target"] = optax.incremental_update(heads["q"], state["q_target"], a.tau)
        return new, info

    def make_update(self, phase: str, shardings):
        """update(state, batches [K,B,...], rng) -> (state, info averaged over K), K updates in one lax.scan."""

        def update(state, batches, rng):
            def body(st, xs):
                batch, key = xs
                return self.step(st, batch, key, phase)

            k = jax.tree.leaves(batches)[0].shape[0]
            state, infos = jax.lax.scan(body, state, (batches, jax.random.split(rng, k)))
            return state, jax.tree.map(jnp.mean, infos)

        return jax.jit(update, donate_argnums=0, out_shardings=(shardings, None))

    def make_advantage(self):
        """A = min Q̄(x, A_data) − V(x) for a batch of precomputed features (after the critic phase)."""

        @jax.jit
        def advantage(state, feats, s, actions):
            chunks = self.norm_actions(actions)[..., : self.A]
            q = self.heads.qs(state["q_target"], feats, s, chunks).min(-1)
            return q - self.heads.value(state["v"], feats, s)

        return advantage

    def make_act(self):
        @jax.jit
        def act(params, obs, rng):  # -> actions [E,H,A] in env units
            c = self.model.config
            prefix = self.model.prefix(params, self.observe(obs))
            noise = self.args.eval_noise * jax.random.normal(
                rng, (obs["state"].shape[0], 1, c.action_horizon, c.action_dim)
            )
            chunks = self.model.sample(params, prefix, noise, self.args.flow_steps)[:, 0, :, : self.A]
            off = libero.state_offset(obs["state"], self.A, self.delta)  # openpi's pi0_libero: action − state
            return pi0.unnormalize(chunks, self.stats["actions"]) + off

        return act


# ----------------------------------------------------------------------------------------------------- eval
def evaluate(act, params, args: Args, rng) -> dict:
    """eval_episodes episodes of the policy over E = min(num_envs, eval_episodes) envs, env e playing episodes e, e+E,
    ... (chunks executed open loop); success rate and return (an episode that never ended counts as a failure)."""
    n = args.eval_episodes
    E = min(args.num_envs, n)
    env = envs.from_args(args, E, args.seed + 10_000, evaluation=True)
    obs, _ = env.reset(seed=args.seed + 10_000)
    todo = (n - np.arange(E) + E - 1) // E  # episodes each env still has to play
    success, ret = 0, 0.0
    per_episode = math.ceil((getattr(env, "max_episode_steps", None) or 1000) / args.action_horizon) + 1
    for _ in range(per_episode * int(todo.max())):
        rng, key = jax.random.split(rng)
        obs_in = {"state": obs["state"], "prompt_id": obs["prompt_id"], "images": obs["images"]}
        actions = np.asarray(act(params, obs_in, key))
        obs, step = envs.execute_chunk(env, obs, actions, args.gamma)
        ended = (step.terminated | step.truncated) & (todo > 0)
        success, ret = success + step.success[ended].sum(), ret + step.episode_return[ended].sum()
        todo -= ended
        if not todo.any():
            break
    env.close()
    return {"eval/success_rate": float(success / n), "eval/return": float(ret / n)}


# ----------------------------------------------------------------------------------------------------- main
def main(args: Args) -> dict:
    args = check(args)
    mesh.init_distributed()
    keys = ("env", "seed", "run_dir", "resume", "track", "wandb_project")
    run = runlog.Run(args, "chunk_awr", **{k: getattr(args, k) for k in keys})
    env = envs.from_args(args, 1, args.seed)
    env.close()  # only its spaces, cameras and prompts are needed here
    if args.dataset is None and args.env != "push":
        raise ValueError(f"--env {args.env}: pass --dataset (HDF5 file or folder); only push has a default dataset")
    path = args.dataset or envs.default_dataset(env="push", noise="mixed", episodes=args.episodes)
    data = qchunk.load_episodes(path, prompts=env.prompts)
    chunks = qchunk.make_chunks(data, args.action_horizon, args.gamma)
    stats = {
        k: {s: np.asarray(v, np.float32) for s, v in qchunk.compute_norm_stats(x).to_dict().items()}
        for k, x in (("state", data.obs["state"]), ("actions", data.actions))
    }
    print(f"{len(data.episode_lengths)} episodes, {len(chunks)} chunks of H={args.action_horizon} from {path}")

    H, A = args.action_horizon, env.action_dim
    if args.pi0_checkpoint:
        params, cfg = pi0.load_openpi_params(args.pi0_checkpoint, action_horizon=H)
        stats = pi0.load_norm_stats(args.pi0_checkpoint, args.asset_id)
    else:
        cfg = pi0.make_config(
            args.pi0_preset, action_dim=A, state_dim=env.state_dim, action_horizon=H, cameras=tuple(env.camera_names)
        )
        params = pi0.Pi0(cfg).init(jax.random.key(args.seed))
    tok = (
        pi0.PaligemmaTokenizer(args.tokenizer, cfg.max_token_len)
        if args.tokenizer
        else pi0.BuiltinTokenizer(cfg.max_token_len, cfg.vocab_size)
    )
    model = pi0.Pi0(cfg)
    learner = Learner(args, model, pi0.make_prompt_table(data.prompts, tok), stats, A)
    m = mesh.make_mesh(args.fsdp_devices)
    hp = learner.heads.init(jax.random.key(args.seed + 1), cfg.vlm.width, cfg.state_dim or cfg.action_dim, H * A)
    state = {
        "params": params,
        "opt": learner.pi_tx.init(params),
        "q": hp["q"],
        "v": hp["v"],
        "q_target": jax.tree.map(jnp.copy, hp["q"]),
        "h_opt": learner.h_tx.init(hp),
        "adv": jnp.zeros(len(chunks), jnp.float32),
        "rng": jax.random.PRNGKey(args.seed),
    }
    shardings = {
        k: mesh.fsdp_sharding(v, m) if k in ("params", "opt") else jax.tree.map(lambda _: mesh.replicated(m), v)
        for k, v in state.items()
    }
    state = jax.device_put(state, shardings)
    critic_steps = args.critic_steps if args.schedule == "two-phase" and args.beta > 0 else 0
    total = critic_steps + args.policy_steps
    step = 0
    if args.resume and (restored := run.restore(state)) is not None:
        step, state, _ = restored
        state = jax.device_put(state, shardings)
        print(f"resumed at step {step}")

    def save(step):
        run.save(step, state, {"norm_stats": stats, "step": step, "critic_steps": critic_steps})

    np_rng = np.random.default_rng(args.seed + step)
    act = learner.make_act()
    phase_of = "joint" if args.schedule == "joint" else "policy"
    updates = {p: learner.make_update(p, shardings) for p in ("critic", phase_of)}
    feats, cdf = None, None
    train_s, result, last_eval = 0.0, {}, -1

    def do_eval(step):
        nonlocal result, last_eval
        last_eval = step
        t = time.time()
        rng = jax.random.fold_in(jax.random.key(args.seed), step)
        result = {**evaluate(act, state["params"], args, rng), "time/train_s": train_s, "time/eval_s": 0.0}
        result["time/eval_s"] = time.time() - t
        run.log(step, result)
        print(
            f"[eval] step {step}: success {result['eval/success_rate']:.2f}  return {result['eval/return']:.3f}  "
            f"(train {train_s:.0f}s, eval {result['time/eval_s']:.1f}s)",
            flush=True,
        )

    def encode_all(params):  # features of every frame with the frozen initial π₀ (critic phase)
        enc = jax.jit(learner.encode)
        out_f, out_s = [], []
        for lo in range(0, len(data), 4096):
            i = np.arange(lo, min(lo + 4096, len(data)))
            images = {k: v[i] for k, v in data.obs["images"].items()}
            f, s = enc(params, {"state": data.obs["state"][i], "prompt_id": data.obs["prompt_id"][i], "images": images})
            out_f.append(np.asarray(f)), out_s.append(np.asarray(s))
        return np.concatenate(out_f), np.concatenate(out_s)

    def batches(n, bsize, phase):  # n batches stacked [n,B,...]
        rows = []
        for _ in range(n):
            if phase == "policy" and cdf is not None:  # weighted sampling: P(i) ∝ w_i (inverse CDF)
                i = np.minimum(np.searchsorted(cdf, np_rng.uniform(0, cdf[-1], bsize)), len(chunks) - 1)
            else:
                i = np_rng.integers(0, len(chunks), bsize)
            b = chunks.get(i)
            b.pop("rewards")
            if phase == "critic" and feats is not None:
                oi, ni = chunks.obs_idx[i], chunks.next_obs_idx[i]
                b.update(
                    features=feats[0][oi], state_n=feats[1][oi], next_features=feats[0][ni], next_state_n=feats[1][ni]
                )
                b.pop("obs"), b.pop("next_obs")
            if phase == "policy":
                b["adv"] = adv_table[i] if cdf is None else np.zeros(bsize, np.float32)  # sampled: w = exp(0) = 1
                b.pop("next_obs")
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
        print(
            f"[critic] advantage std {np.std(state['adv']):.4f}; weights mean {w.mean():.3g}, clipped "
            f"{(w >= args.max_weight).mean():.1%}"
        )
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
        t = time.time()
        k = min(args.updates_per_call, total - step)
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
    return {
        **result,
        "step": step,
        "policy_updates": step - critic_steps,
        "run_dir": run.dir,
        "time/train_s": train_s,
        "time/policy_updates_per_s": (step - s0) / max(pol_s, 1e-9),
    }


if __name__ == "__main__":
    main(tyro.cli(Args))
