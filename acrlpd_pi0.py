"""Offline-to-online Q-chunking with prior data (RLPD on action chunks), π₀ as the policy.

Method: Li, Zhou and Levine, "Reinforcement Learning with Action Chunking" (2025) on top of RLPD (Ball et al., 2023).
  - π₀'s flow-matching loss on data chunks is the behaviour-cloning term (--bc-weight).
  - A critic ensemble (--num-qs LayerNorm MLPs) reads [stop_gradient(π₀ prefix features), state, H×A chunk] and
    learns the chunked n-step TD target   y = Σ_{k<H} γ^k r_{t+k} + γ^H · mask · Q̄(o_{t+H}, a′),
    a′ = the best of --target-n π₀ chunks at o_{t+H} ranked by the online critic (expected-max backup),
    Q̄ = the target ensemble's mean (or the min of a random pair, --q-agg min2); targets Polyak-averaged (τ).
  - Acting: --bon N chunks from one prefix pass, the one with the highest pessimistic value mean − β·std of the
    ensemble (--act-pessimism β) is executed open loop. --bon 1 is plain π₀.
  - Conservative term (--cql-weight): the critic's mean value of π₀'s own chunks at o_t minus that of the data chunk.
    Without it the critic overvalued off-data chunks and best-of-8 lost to plain π₀ (push, 2k updates: 9% vs 20%);
    with it best-of-8 was ahead (14% vs 11%), at the price of pessimistic (negative) values.
  - Offline phase on the prior data, then online with 50/50 offline/online batches and --utd updates per env chunk.
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

# Values by platform; a flag given explicitly (not None) wins. Matched by substring of --env.
PRESETS = {
    "push": dict(action_horizon=5, bon=8, target_n=4, num_qs=10, lr=1e-3, critic_lr=3e-4, bc_weight=1.0),
    "libero": dict(action_horizon=10, bon=32, target_n=8, num_qs=10, lr=2.5e-5, critic_lr=3e-4, bc_weight=1.0),
    "aloha": dict(action_horizon=50, bon=16, target_n=8, num_qs=10, lr=2.5e-5, critic_lr=3e-4, bc_weight=1.0),
    "droid": dict(action_horizon=10, bon=16, target_n=8, num_qs=10, lr=2.5e-5, critic_lr=3e-4, bc_weight=1.0),
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
    num_envs: int = 16
    """parallel environments in the online phase"""

    asset_id: str | None = None
    """norm-stats asset of the checkpoint (e.g. physical-intelligence/libero)"""
    action_horizon: int | None = None
    """H, the chunk length (preset)"""
    flow_steps: int = 5
    """Euler steps when acting"""
    image_size: int = 0
    """camera image size (push: 0 = state only; libero: 0 = the dataset's)"""

    offline_steps: int = 1500
    """updates on the prior data before going online"""
    online_steps: int = 600
    """updates in the online phase (each env chunk step is followed by --utd updates)"""
    batch_size: int = 64
    """chunk transitions per update"""
    updates_per_call: int = 20
    """offline updates per jitted call (lax.scan)"""
    utd: int = 4
    """online updates per env chunk step, run in one jitted scan"""
    gamma: float = 0.99
    """per-step discount"""
    lr: float | None = None
    """π₀ learning rate (preset)"""
    critic_lr: float | None = None
    """critic learning rate (preset)"""
    bc_weight: float | None = None
    """weight of the flow-matching (BC) loss (preset)"""
    bc_online: bool = False
    """also imitate online rollouts (False: BC only on the prior data; failed rollouts pulled BC down)"""
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
    target_flow_steps: int = 3
    """Euler steps for those target chunks"""
    bon: int | None = None
    """chunks sampled when acting, best by the critic; 1 = plain π₀ (preset)"""
    bon_slice: int = 0
    """score the --bon candidates in slices of this many (lax.map) to bound memory; 0: all at once"""
    act_pessimism: float = 1.0
    """β: acting ranks candidates by ensemble mean − β·std"""
    cql_weight: float = 0.5
    """conservative penalty: mean Q of π₀ chunks at o_t minus Q of the data chunk (0: off; off, best-of-N hurt)"""
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

    def q(self, cparams, prefix, chunks):
        """Ensemble values of chunks [B,N,H_m,A_m] (normalised) -> [E,B,N]; members vmapped, executed part only."""
        B, N = chunks.shape[:2]
        head = jnp.concatenate([jax.lax.stop_gradient(prefix.features), prefix.state], -1)  # [B,W+S]
        x = jnp.concatenate([jnp.broadcast_to(head[:, None], (B, N, head.shape[-1])),
                             self.io.executed(chunks).reshape(B, N, -1)], -1)  # fmt: skip
        return jax.vmap(self.critic.apply, in_axes=(0, None))({"params": cparams}, x)

    def sample(self, params, prefix, rng, n: int, steps: int):  # -> [B,n,H,A_m]
        c = self.model.config
        noise = jax.random.normal(rng, (prefix.mask.shape[0], n, c.action_horizon, c.action_dim))
        return self.model.sample(params, prefix, noise, steps)

    def best_of_n(self, params, cparams, prefix, rng, n: int, steps: int, beta: float, slice_: int = 0):
        """Sample n chunks per observation from one prefix, pick argmax of mean − β·std. -> chunk, q_mean, index."""
        S = slice_ or n

        def part(key):
            cand = self.sample(params, prefix, key, S, steps)  # [B,S,H,A_m]
            q = self.q(cparams, prefix, cand)  # [E,B,S]
            return cand, q.mean(0), q.std(0)

        cand, qm, qs = jax.lax.map(part, jax.random.split(rng, n // S))  # [n/S,B,S,...]
        cand, qm, qs = (jnp.moveaxis(x, 0, 1).reshape(x.shape[1], n, *x.shape[3:]) for x in (cand, qm, qs))
        idx = jnp.argmax(qm - beta * qs, axis=1)  # [B]
        take = jnp.arange(idx.shape[0])
        return cand[take, idx], qm[take, idx], idx


def td_target(agent: Agent, params, target_cparams, next_prefix, batch, rng):
    """y = R + γ^{#valid}·mask·Q̄(o_{t+H}, a′), a′ = argmax over --target-n π₀ chunks of the online critic mean.

    All inputs are treated as constants (stop_gradient): the target never trains anything. -> y [B], info.
    """
    a = agent.args
    k_cand, k_pair = jax.random.split(rng)
    a_next, _, _ = agent.best_of_n(
        params["pi"], params["critic"], next_prefix, k_cand, a.target_n, a.target_flow_steps, beta=0.0
    )  # [B,H,A_m]
    q_next = agent.q(target_cparams, next_prefix, a_next[:, None])[:, :, 0]  # [E,B]
    if a.q_agg == "min2":
        pair = jax.random.choice(k_pair, q_next.shape[0], (2,), replace=False)
        q_bar = q_next[pair].min(0)
    else:
        q_bar = q_next.mean(0)
    y = batch["discounted_return"] + batch["discount"] * batch["mask"] * q_bar
    return jax.lax.stop_gradient(y), {"charts/q_target": y.mean()}


def loss_fn(train, target_cparams, agent: Agent, batch, y, rng):
    """BC (flow matching, weighted by valid) + critic TD + optional CQL and actor terms. -> (loss, info)."""
    a, model = agent.args, agent.model
    k_flow, k_cql, k_actor = jax.random.split(rng, 3)
    prefix = model.prefix(train["pi"], agent.io.observe(batch["obs"]))  # the one VLM pass for o_t
    if a.freeze_backbone:
        prefix = jax.lax.stop_gradient(prefix)
    actions = agent.io.to_model(batch["actions"], batch["obs"]["state"])  # [B,H_m,A_m]
    w = batch["valid"].astype(jnp.float32)  # [B,H] padded steps past the episode's end are not imitated
    if not a.bc_online:
        w = w * (1.0 - batch["is_online"].astype(jnp.float32))[:, None]
    bc = model.flow_loss(train["pi"], prefix, actions, k_flow)  # [B,H_m]
    bc_loss = (bc * agent.io.step_weights(w)).sum() / jnp.maximum(w.sum(), 1.0)
    q_data = agent.q(train["critic"], prefix, actions[:, None])[:, :, 0]  # [E,B]
    critic_loss = jnp.mean(jnp.square(q_data - y[None]))
    loss = a.bc_weight * bc_loss + critic_loss
    info = {"losses/bc": bc_loss, "losses/critic": critic_loss, "charts/q_data": q_data.mean()}
    if a.cql_weight > 0:  # push down π₀'s own chunks at o_t relative to the data chunk (CQL-style)
        cand = agent.sample(
            jax.lax.stop_gradient(train["pi"]), jax.lax.stop_gradient(prefix), k_cql, a.target_n, a.target_flow_steps
        )
        q_pi = agent.q(train["critic"], prefix, jax.lax.stop_gradient(cand))  # [E,B,N]
        if a.cql_bound:  # Cal-QL: push π₀'s chunks down no lower than the data's Monte Carlo return (NaN online)
            q_pi = jnp.maximum(q_pi, jnp.nan_to_num(batch["return_to_go"], nan=-jnp.inf)[None, :, None])
        gap = q_pi.mean(-1) - q_data  # [E,B]
        loss = loss + a.cql_weight * gap.mean()
        info["losses/cql_gap"] = gap.mean()
    if a.actor_weight > 0:  # −Q(o, π₀(o)) through the Euler steps; the critic is a constant here
        act = agent.sample(train["pi"], prefix, k_actor, 1, a.flow_steps)
        actor = -agent.q(jax.lax.stop_gradient(train["critic"]), prefix, act).mean()
        loss = loss + a.actor_weight * actor
        info["losses/actor"] = actor
    return loss, info


def make_update(agent: Agent, tx):
    """update(state, batches [U,B,...], rng) -> (state, info): U updates in one lax.scan."""

    def one(state, batch, rng):
        k_t, k_l = jax.random.split(rng)
        params = {"pi": state["pi"], "critic": state["critic"]}
        next_prefix = jax.lax.stop_gradient(agent.model.prefix(state["pi"], agent.io.observe(batch["next_obs"])))
        y, info_t = td_target(agent, jax.lax.stop_gradient(params), state["target"], next_prefix, batch, k_t)
        (_, info), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state["target"], agent, batch, y, k_l)
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        target = optax.incremental_update(params["critic"], state["target"], agent.args.tau)
        return {**state, **params, "target": target, "opt": opt}, {**info, **info_t}

    return mesh.scan_updates(one)


def make_tx(args: Args, model: pi0.Pi0, params):
    """Adam for π₀ and for the critic; under --freeze-backbone the VLM's parameters get zero updates."""
    frozen = model.backbone_mask(params["pi"]) if args.freeze_backbone else jax.tree.map(lambda _: False, params["pi"])
    labels = {
        "pi": jax.tree.map(lambda f: "frozen" if f else "pi", frozen),
        "critic": jax.tree.map(lambda _: "c", params["critic"]),
    }
    pi_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    return optax.multi_transform({"pi": pi_tx, "frozen": optax.set_to_zero(), "c": optax.adam(args.critic_lr)}, labels)


# ----------------------------------------------------------------------------------------------------- acting / eval
def make_act(agent: Agent):
    @partial(jax.jit, static_argnames="n")
    def act(state, obs, rng, n: int, beta: float):
        """Best of n chunks by mean − β·std (n = 1: plain π₀) -> env-unit chunk [B,H,A], critic mean there [B]."""
        prefix = agent.model.prefix(state["pi"], agent.io.observe(obs))
        a = agent.args
        chunk, q, _ = agent.best_of_n(
            state["pi"], state["critic"], prefix, rng, n, a.flow_steps, beta, a.bon_slice if n == a.bon else 0
        )
        return agent.io.to_env(chunk, obs["state"]), q

    return act


def evaluate_both(act, state, args: Args, rng) -> dict:
    """One episode in each of --eval-episodes envs per policy: success, return and the critic's calibration (its value
    of the chunks it chose, eval/*q_pred, vs the discounted return that followed, eval/*q_realised)."""

    def ev(n: int, beta: float, prefix: str) -> dict:  # best of n chunks by mean − β·std
        policy = lambda obs, key: act(state, obs, key, n, beta)
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

    k_pi, k_c, k_run = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    params = params or {"pi": model.init(k_pi)}
    x = jnp.zeros((1, cfg.vlm.width + (cfg.state_dim or cfg.action_dim) + H * env.action_dim))
    params["critic"] = jax.vmap(lambda k: agent.critic.init(k, x)["params"])(jax.random.split(k_c, args.num_qs))
    tx = make_tx(args, model, params)
    state = {**params, "target": jax.tree.map(jnp.copy, params["critic"]), "opt": tx.init(params)}
    state = jax.device_put(state, mesh.fsdp_sharding(state, dev_mesh))
    print(
        f"π₀ {pi0.param_count(state['pi']) / 1e6:.2f}M params, critic {args.num_qs}×"
        f"{pi0.param_count(state['critic']) / args.num_qs / 1e3:.0f}k, {len(offline)} offline chunks (H={H})"
    )

    where = dict(run_dir=args.run_dir, resume=args.resume, track=args.track, wandb_project=args.wandb_project)
    run = runlog.Run(args, "acrlpd_pi0", env=args.env, seed=args.seed, **where)
    buffer = qchunk.ReplayBuffer(args.buffer_size, H, args.gamma, env.reset(seed=args.seed)[0])
    step = 0
    buf_file = os.path.join(run.dir, "buffer.npz")
    if args.resume and (restored := run.restore(state)) is not None:
        step, state, _ = restored
        buffer.load(buf_file)
        print(f"resumed {run.dir} at update {step} ({len(buffer)} online chunks)")

    def save(step):
        run.save(step, state, {"step": step, "norm_stats": stats})
        buffer.save(buf_file)

    update, act = make_update(agent, tx), make_act(agent)
    np_rng = np.random.default_rng(args.seed + step)
    sampler = qchunk.MixedSampler(offline, buffer, args.online_fraction)
    keys = ("obs", "next_obs", "actions", "discounted_return", "discount", "mask", "valid", "is_online", "return_to_go")

    split = NamedSharding(dev_mesh, PartitionSpec(None, mesh.BATCH_AXES))  # [U,B,...]: B over the devices

    def batches(n):  # n updates' batches (each mixed offline/online) stacked on a leading axis, [n,B,...]
        bs = [{k: v for k, v in sampler.sample(np_rng, args.batch_size).items() if k in keys} for _ in range(n)]
        return jax.device_put(jax.tree.map(lambda *v: np.stack(v), *bs), split)

    total, results, info, obs = args.offline_steps + args.online_steps, {}, {}, env.reset(seed=args.seed)[0]
    for phase in ("offline", "online"):
        end = args.offline_steps if phase == "offline" else total
        t_phase, s_phase, ep_returns = time.time(), step, []
        while step < end:
            k_act, k_upd = jax.random.split(jax.random.fold_in(k_run, step))  # resumes reproducibly
            if phase == "offline":
                n = min(args.updates_per_call, end - step)
            else:  # one chunk in every env, then --utd updates
                chunk, _ = act(state, obs, k_act, args.bon, args.act_pessimism)
                chunk = np.asarray(chunk)
                next_obs, cs = envs.execute_chunk(env, obs, chunk, args.gamma)
                buffer.add(obs, chunk, cs)
                ep_returns += list(cs.success[cs.terminated | cs.truncated])
                obs, n = next_obs, min(args.utd, end - step)
            state, info = update(state, batches(n), k_upd)
            prev, step = step, step + n
            if step // args.log_every > prev // args.log_every or step == end:
                m = {k: float(v) for k, v in jax.device_get(info).items()}
                m["charts/updates_per_s"] = (step - s_phase) / (time.time() - t_phase)
                if phase == "online" and ep_returns:
                    m["charts/online_success_rate"] = float(np.mean(ep_returns[-100:]))
                run.log(step, m)
                shown = {"bc": m["losses/bc"], "critic": m["losses/critic"], "q_data": m["charts/q_data"]}
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
