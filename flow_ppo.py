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
Both the stored and the recomputed log-likelihood come from `chain_logprob` on the stored chain, so the first ratio is 1.
Rollouts run chunks open loop in vectorised envs; GAE(γ^H, λ) over chunk steps; clipped PPO (optional dual clip),
clipped value loss on a value head over the detached prefix features; evaluation uses the deterministic ODE.

Full:  python flow_ppo.py                       (push: BC warm start of the CPU π₀, then PPO; ≤ 10 min on 2 cores)
Smoke: python flow_ppo.py --bc-steps 20 --iterations 2 --num-envs 8 --num-steps 4 --eval-episodes 8
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

from common import envs, libero, mesh, pi0, qchunk, runlog


@dataclass
class Args(runlog.RunArgs):
    exp_name: str = "flow_ppo"
    """name of the run (wandb group)"""
    dataset: str | None = None
    """prior data for the BC warm start: robomimic/LIBERO HDF5 or a LeRobot folder; push default: noise-0.6 demos"""
    pi0_checkpoint: str | None = None
    """start from an openpi checkpoint dir, or a run dir of acrlpd_pi0.py / chunk_awr.py / flow_ppo.py (skips BC)"""
    save_every: int = 50
    """checkpoint every this many PPO iterations (and at the end)"""
    log_every: int = 5
    """log metrics every this many PPO iterations (BC: every 10x this many steps)"""
    eval_every: int = 20
    """evaluate the deterministic policy every this many PPO iterations"""
    eval_episodes: int = 200
    """episodes per evaluation (run in parallel)"""
    num_envs: int = 128
    """parallel rollout envs"""
    action_horizon: int = 5
    """H: actions per chunk, executed open loop"""
    flow_steps: int = 4
    """K: Euler steps, the same in rollouts and evaluation"""
    freeze_backbone: bool = True
    """PPO: keep the VLM (prefix) fixed, train the action expert, projections and heads (stable value features)"""
    asset_id: str | None = None
    """norm-stats asset id inside --pi0-checkpoint (openpi)"""
    # behaviour cloning warm start
    bc_steps: int = 10_000
    """flow-matching BC steps on the prior data before PPO (0: none); ~2.5 min on 2 cores, ~35-45% success on push"""
    bc_batch_size: int = 64
    """BC batch size"""
    bc_lr: float = 1e-3
    """BC learning rate"""
    # PPO
    noise_method: Literal["flow_noise", "flow_sde"] = "flow_noise"
    """how the denoising chain is made stochastic"""
    iterations: int = 300
    """PPO iterations (rollout + update)"""
    time_limit_min: float = 9.5
    """stop PPO (final eval + checkpoint) once the run has taken this many minutes (0: no limit)"""
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
    learning_rate: float = 1e-4
    """policy (π₀ + noise head) learning rate"""
    value_lr: float = 1e-3
    """value head learning rate"""
    critic_warmup: int = 5
    """first iterations that train only the value head"""
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
    max_grad_norm: float = 1.0
    """global-norm gradient clipping"""
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


# ------------------------------------------------------------------------------------------------------ networks
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


def gaussian_logpdf(x, mean, std, mask):
    """log N(x; mean, std²) summed over the trailing H, A axes where mask [H,A] is 1 (executed). [..., H, A] -> [...]"""
    log_n = -0.5 * jnp.square((x - mean) / std) - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)
    return jnp.sum(mask * log_n, axis=(-2, -1))


def flow_times(k: int):
    """Flow times t_0..t_{K-1} of the Euler steps (t=1 noise → t=0 action) and the step size δ."""
    return 1.0 - jnp.arange(k, dtype=jnp.float32) / k, 1.0 / k


def transition(args: Args, noise_head: NoiseHead, heads, v, out, x, t, delta):
    """The stochastic step's Gaussian (mean, std) at x_k, t_k (shapes [B,N,H,A], t [B,N]); ODE mean for flow_sde too."""
    if args.noise_method == "flow_noise":
        return x - delta * v, noise_head.apply(heads["noise"], out)
    tt = t[..., None, None]
    sigma = args.sde_noise_level * jnp.sqrt(jnp.minimum(tt, 1.0 - delta) / (1.0 - jnp.minimum(tt, 1.0 - delta)))
    mean = x - delta * (v + sigma**2 / (2 * tt) * (x + (1 - tt) * v))
    return mean, jnp.broadcast_to(sigma * jnp.sqrt(delta), x.shape)


def chain_logprob(args: Args, model, noise_head, params, heads, prefix, chain, sde_step, mask):
    """log π(chain), entropy, mean std of the stochastic steps where `mask` [H,A] is 1 (`EnvIO.executed_mask`: what
    reaches the env). chain [B,K+1,H,A], sde_step [B] -> [B], [B], [B].

    Used both at rollout (the old log-likelihood) and in the loss, on the same stored chain (ratio 1 before an update).
    All K steps of flow_noise are evaluated as N=K candidates sharing one prefix cache.
    """
    (B, K), rows = (chain.shape[0], chain.shape[1] - 1), jnp.arange(chain.shape[0])
    times, delta = flow_times(K)
    if args.noise_method == "flow_noise":  # x_k -> x_{k+1} for every k: [B,K,H,A], [B,K]
        x, t, nxt = chain[:, :K], jnp.broadcast_to(times, (B, K)), chain[:, 1:]
    else:  # the one stochastic step: [B,1,H,A], [B,1]
        x, t, nxt = chain[rows, sde_step][:, None], times[sde_step][:, None], chain[rows, sde_step + 1][:, None]
    v, out = model.velocity(params, prefix, x, t)
    mean, std = transition(args, noise_head, heads, v, out, x, t, delta)
    terms = gaussian_logpdf(nxt, mean, std, mask)  # [B,K] or [B,1]
    if args.noise_method == "flow_noise":  # with log N(x_0; 0, I): constant, part of the chain's density
        terms = jnp.concatenate([gaussian_logpdf(chain[:, 0], 0.0, 1.0, mask)[:, None], terms], axis=1)
        logp = terms.mean(1) if args.logprob_reduce == "mean" else terms.sum(1)
    else:
        logp = terms[:, 0]
    mean_over = lambda x: jnp.mean(jnp.sum(mask * x, axis=(2, 3)) / mask.sum(), axis=1)  # [B,N,H,A] -> [B]
    return logp, mean_over(0.5 * jnp.log(2 * jnp.pi * jnp.e) + jnp.log(std)), mean_over(std)


def sample_chain(args: Args, model, noise_head, params, heads, prefix, rng, batch: int):
    """Sample the stochastic chain. -> chain [B,K+1,H,A], sde_step [B] (the stochastic step of flow_sde)."""
    K, (H, A) = args.flow_steps, (model.config.action_horizon, model.config.action_dim)
    times, delta = flow_times(K)
    k0, k_step, k_noise = jax.random.split(rng, 3)
    sde_step = jax.random.randint(k_step, (batch,), 0, K)
    eps = jax.random.normal(k_noise, (K, batch, 1, H, A))

    def step(x, inp):  # x [B,1,H,A]
        k, e = inp
        t = jnp.full((batch, 1), times[k])
        v, out = model.velocity(params, prefix, x, t)
        mean, std = transition(args, noise_head, heads, v, out, x, t, delta)
        if args.noise_method == "flow_noise":
            nxt = mean + std * e
        else:  # only step `sde_step` is stochastic; the others follow the ODE
            nxt = jnp.where((sde_step == k)[:, None, None, None], mean + std * e, x - delta * v)
        return nxt, nxt[:, 0]

    x0 = jax.random.normal(k0, (batch, 1, H, A))
    _, xs = jax.lax.scan(step, x0, (jnp.arange(K), eps))
    return jnp.concatenate([x0, jnp.moveaxis(xs, 0, 1)], axis=1), sde_step


# ------------------------------------------------------------------------------------------------------ advantages
def gae(rewards, values, next_value, terminated, truncated, final_values, gamma_chunk: float, lam: float):
    """GAE(γ_c, λ) over chunk steps, [T,E] arrays; returns (advantages, returns) [T,E].

    A terminated chunk does not bootstrap; a truncated one bootstraps from V(final obs) (folded into its reward);
    either way the recursion stops there because the env is reset at the chunk boundary.
    """
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


# ------------------------------------------------------------------------------------------------------ losses
def ppo_loss(train, batch, args: Args, model, io: pi0.EnvIO, noise_head, value_head, train_policy):
    """Clipped PPO on the chain likelihood + clipped value loss − entropy bonus. -> (loss, info)."""
    obs = io.observe(batch["obs"])
    prefix = model.prefix(train["params"], obs)  # prefix inside the loss: the backbone may train
    if args.freeze_backbone:  # no backward pass through the VLM at all
        prefix = jax.lax.stop_gradient(prefix)
    chain, mask = (batch["chain"], batch["sde_step"]), io.executed_mask()
    logp, entropy, std = chain_logprob(args, model, noise_head, train["params"], train["heads"], prefix, *chain, mask)
    logratio = logp - jax.lax.stop_gradient(batch["logp"])  # the old log-likelihood, stored at rollout
    ratio = jnp.exp(logratio)
    adv = jax.lax.stop_gradient(batch["advantages"])  # normalised over the whole rollout in `update`
    pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - args.clip_coef, 1 + args.clip_coef))
    if args.dual_clip > 1.0:  # Ye et al. 2020: bound the loss of negative advantages at c·|A|
        pg = jnp.where(adv < 0, jnp.minimum(pg, -args.dual_clip * adv), pg)
    pg_loss = pg.mean()
    value = value_head.apply(train["heads"]["value"], prefix.features, obs.state)  # reads detached features
    ret, old_v = jax.lax.stop_gradient(batch["returns"]), jax.lax.stop_gradient(batch["values"])
    v_loss = jnp.square(value - ret)
    if args.clip_vloss:
        v_clip = old_v + jnp.clip(value - old_v, -args.clip_coef, args.clip_coef)
        v_loss = jnp.maximum(v_loss, jnp.square(v_clip - ret))
    v_loss = 0.5 * v_loss.mean()
    ent = entropy.mean()
    loss = jnp.where(train_policy, pg_loss - args.ent_coef * ent, 0.0) + args.vf_coef * v_loss  # value-only warmup
    info = {
        "losses/policy": pg_loss,
        "losses/value": v_loss,
        "losses/entropy": ent,
        "losses/approx_kl": jnp.mean((ratio - 1) - logratio),
        "charts/clip_frac": jnp.mean(jnp.abs(ratio - 1) > args.clip_coef),
        "charts/noise_std": std.mean(),
        "charts/ratio_mean": ratio.mean(),
        "charts/ratio_max_dev": jnp.max(jnp.abs(ratio - 1)),
    }
    return loss, info


def make_update(args: Args, model, io: pi0.EnvIO, noise_head, value_head, tx):
    """update(state, batch, rng, train_policy) -> (state, info): epochs × minibatches in one lax.scan."""

    def minibatch_step(carry, mb):
        state, stopped = carry
        train = {"params": state["params"], "heads": state["heads"]}
        grads, info = jax.grad(ppo_loss, has_aux=True)(
            train, mb, args, model, io, noise_head, value_head, mb["train_policy"]
        )
        updates, opt = tx.update(grads, state["opt"], train)
        new = optax.apply_updates(train, updates)
        new_state = {"params": new["params"], "heads": new["heads"], "opt": opt}
        # KL early stop: once exceeded, the remaining minibatches leave the state as it is
        new_state = jax.tree.map(lambda n, o: jnp.where(stopped, o, n), new_state, state)
        if args.target_kl is not None:
            stopped = stopped | (info["losses/approx_kl"] > args.target_kl)
        info["charts/grad_norm"] = optax.tree.norm(grads)
        return (new_state, stopped), info

    def update(state, batch, rng, train_policy):
        n, adv = batch["logp"].shape[0], batch["advantages"]
        batch = {**batch, "advantages": (adv - adv.mean()) / (adv.std() + 1e-8)}
        mb_size = n // args.num_minibatches

        def epoch(carry, key):
            perm = jax.random.permutation(key, n)[: mb_size * args.num_minibatches]
            mbs = jax.tree.map(lambda x: x[perm].reshape(args.num_minibatches, mb_size, *x.shape[1:]), batch)
            mbs["train_policy"] = jnp.broadcast_to(train_policy, (args.num_minibatches,))
            return jax.lax.scan(minibatch_step, carry, mbs)

        (state, stopped), info = jax.lax.scan(
            epoch, (state, jnp.bool_(False)), jax.random.split(rng, args.update_epochs)
        )
        out = jax.tree.map(jnp.mean, info)
        out["charts/first_ratio_dev"] = info["charts/ratio_max_dev"][0, 0]  # first minibatch of the first epoch
        out["charts/kl_stopped"] = stopped.astype(jnp.float32)
        return state, out

    return update


# ------------------------------------------------------------------------------------------------------ setup
def behaviour_cloning(args: Args, model, io: pi0.EnvIO, params, chunks, run, log_step0: int):
    """Flow-matching BC of π₀ on the prior data's chunks (the warm start)."""
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(args.bc_lr))
    opt = tx.init(params)

    @jax.jit
    def bc_update(params, opt, batch, rng):
        def loss_fn(p):
            acts = io.to_model(batch["actions"])  # normalised, zero-padded to π₀'s action dim (openpi: 32)
            w = io.step_weights(batch["valid"].astype(jnp.float32))  # [B,H_m]: 0 past the episode's end, discarded
            return jnp.sum(model.flow_loss(p, io.observe(batch["obs"]), acts, rng) * w) / jnp.maximum(w.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    np_rng, rng, start = np.random.default_rng(args.seed), jax.random.key(args.seed + 1), time.time()
    for i in range(1, args.bc_steps + 1):
        batch = {k: v for k, v in chunks.sample(np_rng, args.bc_batch_size).items() if k in ("obs", "actions", "valid")}
        rng, key = jax.random.split(rng)
        params, opt, loss = bc_update(params, opt, batch, key)
        if i % (10 * args.log_every) == 0 or i == args.bc_steps:
            run.log(log_step0 + i, {"losses/bc": loss, "time/bc_sps": (i) / (time.time() - start)})
            run.progress(i, args.bc_steps, "bc", 0, start, loss=float(loss))
    return params


def flat(x) -> jax.Array:
    """[T,E,...] -> [T·E,...]"""
    return x.reshape(-1, *x.shape[2:])


# ------------------------------------------------------------------------------------------------------ main
def main(args: Args) -> dict[str, float]:
    runlog.check_choices(args)
    mesh.init_distributed()
    for name in ("num_envs", "num_steps", "flow_steps", "iterations", "update_epochs", "num_minibatches"):
        if getattr(args, name) < (0 if name == "iterations" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")
    if (n := args.num_envs * args.num_steps) % args.num_minibatches:
        raise ValueError(f"num_envs × num_steps ({n}) must be divisible by --num-minibatches ({args.num_minibatches})")
    if args.noise_method == "flow_sde" and args.flow_steps < 2:
        raise ValueError("flow_sde needs --flow-steps ≥ 2 (σ_t is evaluated at t ≤ 1 − δ, which is 0 for one step)")
    if not 0 < args.min_std <= args.max_std:
        raise ValueError(f"need 0 < --min-std ({args.min_std}) ≤ --max-std ({args.max_std})")
    t_main = time.time()
    run = runlog.Run.from_args(args, "flow_ppo")
    np.random.seed(args.seed)
    env = envs.from_args(args, args.num_envs, args.seed)
    A, H, cams = env.action_dim, args.action_horizon, tuple(env.camera_names)
    H_m = args.model_horizon or H  # π₀'s chunk; its first H actions are executed
    if args.pi0_checkpoint:  # openpi, or a run folder of these scripts (the sizes its shapes leave open: the preset's)
        rc = dict(max_token_len=pi0.PRESETS[args.pi0_preset].max_token_len, state_dim=env.state_dim, cameras=cams)
        params, cfg, stats = runlog.load_pi0(args.pi0_checkpoint, H_m, asset_id=args.asset_id, run_config=rc)
        cfg, chunks = replace(cfg, cameras=cams or cfg.cameras), None  # the env's cameras, where it has any; no BC
    else:  # from scratch: the prior data gives the norm stats and the BC warm start
        cfg = pi0.make_config(args.pi0_preset, action_dim=A, state_dim=env.state_dim, action_horizon=H_m, cameras=cams)
        data = envs.load_dataset(args.dataset or envs.default_dataset(env=args.env, noise=0.6), args, env.prompts)
        params, chunks, stats = None, qchunk.make_chunks(data, H, args.gamma), qchunk.norm_stats(data)
    prompts = chunks.prompts if chunks is not None else env.prompts  # the env's first, then the data's new ones
    model, table = pi0.Pi0(cfg), pi0.make_prompt_table(prompts, pi0.make_tokenizer(args.tokenizer, cfg))
    delta = libero.openpi_delta_dims(stats) if args.pi0_checkpoint and args.env == "libero" else 0
    io = pi0.EnvIO(cfg, table, stats, A, delta, quantile=cfg.pi05, horizon=H)  # env units <-> π₀'s
    k_model, k_noise, k_value, rng = jax.random.split(jax.random.key(args.seed), 4)
    params = model.init(k_model) if params is None else params
    noise_head, value_head = NoiseHead(cfg.action_dim, args.min_std, args.max_std), ValueHead()
    W, S = cfg.vlm.width, cfg.state_dim or cfg.action_dim
    heads = {"noise": noise_head.init(k_noise, jnp.zeros((1, 1, H, cfg.expert.width)))}
    heads["value"] = value_head.init(k_value, jnp.zeros((1, W)), jnp.zeros((1, S)))
    train = {"params": params, "heads": heads}  # the policy (π₀ + noise head) and the value head: own lrs and clips
    labels = jax.tree.map(lambda _: "policy", train)
    labels["heads"]["value"] = jax.tree.map(lambda _: "value", heads["value"])
    if args.freeze_backbone:
        frozen = model.backbone_mask(params)
        labels["params"] = jax.tree.map(lambda f, lab: "frozen" if f else lab, frozen, labels["params"])
    opt = lambda lr: optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.adam(lr, eps=1e-5))  # noqa: E731
    tx = {"policy": opt(args.learning_rate), "value": opt(args.value_lr), "frozen": optax.set_to_zero()}
    tx = optax.multi_transform(tx, labels)
    state = {"params": params, "heads": heads, "opt": tx.init(train)}
    bc_done, iteration, env_steps = 0, 0, 0
    if args.resume and (restored := run.restore({**state, "rng": jax.random.key_data(rng)})) is not None:
        _, ckpt, extra = restored
        state, rng = {k: ckpt[k] for k in state}, jax.random.wrap_key_data(ckpt["rng"])
        bc_done, iteration, env_steps = extra["bc_step"], extra["iteration"], extra["env_steps"]
        print(f"resumed {run.dir} at BC step {bc_done}, PPO iteration {iteration}")
    bc_steps = args.bc_steps if args.pi0_checkpoint is None else 0
    if bc_done < bc_steps:
        print(f"π₀ ({pi0.param_count(params) / 1e3:.0f}k params): BC warm start for {bc_steps} steps")
        state["params"] = behaviour_cloning(args, model, io, state["params"], chunks, run, 0)
        bc_done = bc_steps
    dev_mesh = mesh.make_mesh(args.fsdp_devices)  # FSDP: π₀ and its Adam moments sharded, the rollout batch split
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))

    @jax.jit
    def act(params, heads, obs, rng):
        o = io.observe(obs)
        prefix = model.prefix(params, o)
        chain, sde_step = sample_chain(args, model, noise_head, params, heads, prefix, rng, o.state.shape[0])
        logp, _, _ = chain_logprob(args, model, noise_head, params, heads, prefix, chain, sde_step, io.executed_mask())
        value = value_head.apply(heads["value"], prefix.features, o.state)
        return io.to_env(chain[:, -1], obs["state"]), chain, sde_step, logp, value

    @jax.jit
    def value_fn(params, heads, obs):
        o = io.observe(obs)
        return value_head.apply(heads["value"], model.prefix(params, o).features, o.state)

    @jax.jit
    def eval_act(params, obs, rng):  # the deterministic ODE from one noise draw
        prefix = model.prefix(params, io.observe(obs))
        noise = jax.random.normal(rng, (obs["state"].shape[0], 1, cfg.action_horizon, cfg.action_dim))
        return io.to_env(model.sample(params, prefix, noise, args.flow_steps)[:, 0], obs["state"])

    update = jax.jit(make_update(args, model, io, noise_head, value_head, tx), donate_argnums=0)
    gae_fn, gamma_chunk = jax.jit(gae, static_argnums=(6, 7)), args.gamma**H  # a chunk step discounts by γ^H

    def save(step):
        extra = dict(bc_step=bc_done, iteration=iteration, env_steps=env_steps, norm_stats=stats)
        run.save(step, {**state, "rng": jax.random.key_data(rng)}, extra)

    def evaluate() -> dict[str, float]:  # the deterministic ODE policy, one episode per env
        policy = lambda obs, key: (eval_act(state["params"], obs, key), None)
        return envs.evaluate(args, policy, jax.random.key(args.seed + 10_000), args.eval_episodes)

    final = {}
    if iteration == 0:  # the start of PPO: BC (or the loaded checkpoint)
        final = evaluate()
        run.log(bc_done, final)
        print(f"start of PPO: success {final['eval/success_rate']:.3f}")
        final["eval/start_success_rate"] = final["eval/success_rate"]
        save(bc_done)
    obs, _ = env.reset(seed=args.seed)
    start, start_it, info, first_dev, ep_success = time.time(), iteration, {}, 0.0, []  # ep_success: since the last log
    limit_s = args.time_limit_min * 60 if args.time_limit_min > 0 else float("inf")
    last = iteration >= args.iterations
    while not last:
        iteration += 1
        roll = []  # per chunk step, what GAE and the update need: {"obs": .., "chain": [E,K+1,H,A], ...}
        for _ in range(args.num_steps):
            rng, key = jax.random.split(rng)
            actions, chain, sde_step, logp, value = act(state["params"], state["heads"], obs, key)
            roll.append({"obs": obs, "chain": chain, "sde_step": sde_step, "logp": logp, "values": value})
            obs, step = envs.execute_chunk(env, obs, np.asarray(actions), args.gamma)
            trunc = step.truncated & ~step.terminated
            final_v = value_fn(state["params"], state["heads"], step.final_obs) if trunc.any() else np.zeros(len(trunc))
            roll[-1].update(rewards=step.discounted_return, term=step.terminated, trunc=trunc)
            roll[-1]["final_v"] = np.asarray(final_v) * trunc
            ep_success += step.success[step.terminated | step.truncated].tolist()
        env_steps += args.num_envs * args.num_steps * H
        last_v = value_fn(state["params"], state["heads"], obs)
        r = jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *roll)  # the T chunk steps stacked, [T,E,...]
        term, trunc = r["term"].astype(jnp.float32), r["trunc"].astype(jnp.float32)
        adv, ret = gae_fn(r["rewards"], r["values"], last_v, term, trunc, r["final_v"], gamma_chunk, args.gae_lambda)
        batch = {k: jax.tree.map(flat, r[k]) for k in ("obs", "chain", "sde_step", "logp", "values")}
        batch.update(advantages=flat(adv), returns=flat(ret))
        rng, key = jax.random.split(rng)
        state, info = update(state, mesh.shard_batch(batch, dev_mesh), key, jnp.bool_(iteration > args.critic_warmup))
        first_dev = max(first_dev, float(info["charts/first_ratio_dev"]))
        step_id = bc_done + iteration
        last = iteration == args.iterations or time.time() - t_main > limit_s
        if last and iteration < args.iterations:
            print(f"time limit of {args.time_limit_min} min reached at PPO iteration {iteration}: stopping")
        if iteration % args.log_every == 0 or last:
            sps = (iteration - start_it) * args.num_envs * args.num_steps * H / (time.time() - start)
            metrics = {**info, "time/sps": sps, "charts/env_steps": env_steps}
            if ep_success:
                metrics["charts/rollout_success"] = float(np.mean(ep_success))
            run.log(step_id, metrics)
            keys = ("charts/clip_frac", "charts/noise_std", "losses/approx_kl")
            shown = {"rollout_success": np.mean(ep_success or [0]), **{k.split("/")[1]: info[k] for k in keys}}
            run.progress(iteration, args.iterations, "ppo", start_it, start, **shown)
            ep_success = []
        if iteration % args.eval_every == 0 or last:
            ev = evaluate()
            run.log(step_id, ev)
            final.update(ev)
            print(f"[eval] iteration {iteration}: success {ev['eval/success_rate']:.3f}")
        if iteration % args.save_every == 0 or last:
            save(step_id)
    env.close()
    run.close()
    final |= {k: float(v) for k, v in info.items()} | {"run_dir": run.dir, "charts/first_ratio_dev_max": first_dev}
    return final | {"charts/env_steps": env_steps, "time/wall_s": time.time() - start}


if __name__ == "__main__":
    main(tyro.cli(Args))
