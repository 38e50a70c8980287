"""The three scripts' jitted functions at full size, from abstract inputs: what bench/memory.py compiles and
bench/gpu.py runs.

Each `Case` is one function a script jits (its own `make_update` / `make_act`, closed over its own `Nets` and `Args`
with --env libero's preset), the abstract arguments it is called with (`jax.ShapeDtypeStruct`s carrying the FSDP
shardings the script gives them: nothing is allocated) and how many samples one call processes. The train states are
`jax.eval_shape`s of the same construction each script's `main` runs; the batches are one row of a synthetic
LIBERO-shaped episode cut by the scripts' own `data.make_chunks` (every key and dtype a script's batch has),
widened to the batch size. What depends on π₀'s outputs (the critic's cached views, PPO's stored chains) is the
`jax.eval_shape` of the script's own function that makes it.

LIBERO as our runs see it: 2 cameras of 224×224 (agentview, wrist), an 8-dim state, 7-dim actions, 10 executed
actions per chunk; openpi's checkpoints: 32-dim actions, chunks of 50 (pi0_libero) or 10 (pi05_libero), prompts of
48 or 200 tokens, the first 6 action dims relative to the state. The CPU preset: the same at its own sizes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import acrlpd_pi0  # noqa: E402
import chunk_awr  # noqa: E402
import dsrl_pi0  # noqa: E402
import flow_ppo  # noqa: E402
from common import data, mesh, pi0, runlog  # noqa: E402

SCRIPTS = ("acrlpd_pi0", "chunk_awr", "flow_ppo", "dsrl_pi0")
MODEL_HORIZON = {"pi0": 50, "pi05": 10, "cpu": 10}  # openpi's pi0_libero / pi05_libero chunks
PROMPTS = ["put both the alphabet soup and the tomato sauce in the basket", "open the middle drawer of the cabinet"]


@dataclass(frozen=True)
class Setup:
    preset: str = "pi0"
    """π₀ size: pi0, pi05 (full size: openpi's LIBERO checkpoints' shapes) or cpu"""
    batch: int = 32
    """rows per update (flow_ppo: per minibatch), over all devices"""
    act_batch: int = 16
    """observations per acting call (the libero preset's --num-envs)"""
    devices: int = 1
    """devices in the mesh; parameters sharded over all of them (--fsdp-devices = devices)"""
    freeze_backbone: bool = False
    """acrlpd_pi0 / flow_ppo --freeze-backbone (chunk_awr always trains the whole π₀)"""
    precision: str | None = None
    """--precision (None: bfloat16 at full size, float32 on the CPU preset)"""
    remat: str | None = None
    """--remat (None: nothing_saveable at full size, none on the CPU preset)"""
    bon: int = 32
    """acrlpd_pi0 --bon"""


@dataclass
class Case:
    name: str  # "<script>/<function>"
    fn: Callable  # the script's jitted function
    args: tuple  # abstract positional arguments (ShapeDtypeStructs with shardings)
    kwargs: dict  # keyword arguments (static ones, and acting's β)
    samples: int  # samples one call processes (batch rows, or observations acted on)
    init: Callable  # key -> the train state, as the script's main builds it (random weights)
    state: Any  # its abstract value (with shardings)
    view: Callable = lambda state: state  # the train state -> the first argument

    def lower(self):
        return self.fn.lower(*self.args, **self.kwargs)

    def concrete(self, seed: int = 0) -> tuple:
        """Real arguments: the train state initialised on its shardings (random weights), random batches, keys."""
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        state = jax.jit(self.init, out_shardings=shardings)(jax.random.key(seed))
        rest = (materialise(a, jax.random.key(seed + 1 + i)) for i, a in enumerate(self.args[1:]))
        return (self.view(state), *rest)


def materialise(tree: Any, rng: jax.Array) -> Any:
    """Random values for abstract leaves, made on their shardings: images uniform in 0..255, floats normal, ints 0
    (valid as prompt ids, step indices and counts), bools True, keys from `rng`."""

    def make(x, key):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(key, x.shape) if x.shape else key
        if x.dtype == jnp.uint8:
            return jax.random.randint(key, x.shape, 0, 256).astype(jnp.uint8)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return jax.random.normal(key, x.shape, x.dtype)
        return jnp.ones(x.shape, x.dtype) if x.dtype == jnp.bool_ else jnp.zeros(x.shape, x.dtype)

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(rng, len(leaves))
    made = [jax.jit(partial(make, x), out_shardings=x.sharding)(k) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, made)


def libero_env(preset: str) -> SimpleNamespace:
    """What the scripts read of a LIBERO env (`common.libero.LiberoVecEnv`), without the simulator."""
    size = 224 if preset != "cpu" else 32
    return SimpleNamespace(
        action_dim=7, state_dim=8, camera_names=["base_0_rgb", "left_wrist_0_rgb"], prompts=PROMPTS, image_size=size
    )


def episode(env: SimpleNamespace, frames: int = 12) -> data.EpisodeData:
    """One synthetic LIBERO-shaped episode (the batch's structure, not its values)."""
    s = env.image_size
    obs = {
        "state": np.zeros((frames, env.state_dim), np.float32),
        "prompt_id": np.zeros(frames, np.int32),
        "images": {c: np.zeros((frames, s, s, 3), np.uint8) for c in env.camera_names},
    }
    return data.EpisodeData(
        obs=obs,
        actions=np.zeros((frames, env.action_dim), np.float32),
        rewards=np.zeros(frames, np.float32),
        terminals=np.zeros(frames, bool),
        subgoal=np.zeros(frames, bool),
        episode_starts=np.array([0]),
        episode_lengths=np.array([frames]),
        truncated=np.array([True]),
        prompts=PROMPTS,
    )


def policy(setup: Setup, env: SimpleNamespace, horizon: int) -> tuple[pi0.Pi0, pi0.EnvIO]:
    """π₀ as `runlog.make_policy` builds it for LIBERO: openpi's checkpoint shapes at full size (32-dim actions,
    delta on the first 6 dims, π₀.₅ quantile norm), the run's precision and remat."""
    full = setup.preset != "cpu"
    dims = dict(action_dim=32, state_dim=None) if full else dict(action_dim=env.action_dim, state_dim=env.state_dim)
    cfg = pi0.make_config(
        setup.preset, **dims, action_horizon=MODEL_HORIZON[setup.preset], cameras=tuple(env.camera_names)
    )
    cfg = dataclasses.replace(cfg, **pi0.train_precision(cfg, setup.precision, setup.remat))
    table = pi0.make_prompt_table(env.prompts, pi0.make_tokenizer(None, cfg), cfg.state_in_prompt)
    unit = lambda d: {
        "mean": np.zeros(d, np.float32),
        "std": np.ones(d, np.float32),
        "q01": -np.ones(d, np.float32),
        "q99": np.ones(d, np.float32),
    }
    stats = {"state": unit(env.state_dim), "actions": unit(env.action_dim)}
    io = pi0.EnvIO(cfg, table, stats, env.action_dim, 6 if full else 0, quantile=cfg.pi05, horizon=horizon)
    return pi0.Pi0(cfg), io


def script_args(module: Any, setup: Setup, **overrides: Any) -> Any:
    """The script's Args for --env libero (its "libero" config), with `overrides`."""
    return runlog.configured(module.CONFIGS, "libero", fsdp_devices=setup.devices, **overrides)


class Abstract:
    """Abstract values placed on one mesh: states sharded by the FSDP rule, batches split over every device."""

    def __init__(self, devices: int):
        if jax.device_count() < devices:
            raise SystemExit(
                f"{devices} devices asked for, {jax.device_count()} visible: on a CPU run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} JAX_PLATFORMS=cpu"
            )
        devs = np.asarray(jax.devices()[:devices]).reshape(1, devices)
        self.mesh = jax.sharding.Mesh(devs, mesh.BATCH_AXES)

    def state(self, init: Callable, rng: jax.Array) -> Any:
        shapes = jax.eval_shape(init, rng)
        shardings = mesh.fsdp_sharding(shapes, self.mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

    def batch(self, tree: Any, rows: int, stacked: bool = False) -> Any:
        """`tree`'s leaves (one row each, [1,...]) as [rows,...] ([1,rows,...] `stacked` for `scan_updates`)."""
        spec = PartitionSpec(None, mesh.BATCH_AXES) if stacked else PartitionSpec(mesh.BATCH_AXES)
        sharding = NamedSharding(self.mesh, spec)
        lead = (1, rows) if stacked else (rows,)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((*lead, *np.shape(x)[1:]), x.dtype, sharding=sharding), tree)

    def scalar(self, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(self.mesh, PartitionSpec()))

    def key(self) -> jax.ShapeDtypeStruct:
        k = jax.eval_shape(lambda: jax.random.key(0))
        return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=NamedSharding(self.mesh, PartitionSpec()))


def _rows(tree: Any, rows: int) -> Any:
    """Abstract [rows,...] versions of arrays (inputs to `jax.eval_shape`)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((rows, *np.shape(x)[1:]), x.dtype), tree)


def _unplaced(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def acrlpd_cases(setup: Setup, ab: Abstract) -> list[Case]:
    """acrlpd_pi0: the offline joint update (π₀ BC + critic), the online critic update on cached views, best-of-N,
    and the online step (best-of-N, then a π₀ update with the VLM frozen)."""
    m = acrlpd_pi0
    args = script_args(m, setup, freeze_backbone=setup.freeze_backbone, bon=setup.bon)
    env = libero_env(setup.preset)
    model, io = policy(setup, env, args.action_horizon)
    cfg = model.config
    nets = m.Nets(model, io, m.Critic(tuple(args.critic_hidden)))
    width = cfg.vlm.width + (cfg.state_dim or cfg.action_dim) + args.action_horizon * env.action_dim
    tx, pi_tx, critic_tx = m.make_optimizers(args, nets, jax.eval_shape(model.init, jax.random.key(0)))

    def init(key):  # as acrlpd_pi0.main builds its state
        k_pi, k_critic = jax.random.split(key)
        params = model.init(k_pi)
        critic = jax.vmap(lambda k: nets.critic.init(k, jnp.zeros((1, width)))["params"])(
            jax.random.split(k_critic, args.num_qs)
        )
        temp = {"log": jnp.zeros(()), "target": jnp.zeros(()), "set": jnp.zeros((), bool)}
        state = {"params": params, "opt": tx.init(params), "pi_opt": pi_tx.init(params), "temp": temp, "critic": critic}
        state["ema"] = jax.tree.map(jnp.copy, m.expert_part(nets, params)) if args.ema_decay > 0 else {}
        return {**state, "critic_opt": critic_tx.init(critic), "target_critic": critic}

    state = ab.state(init, jax.random.key(0))
    row = data.make_chunks(episode(env), args.action_horizon, args.gamma).get(np.array([0]))
    keys = ("obs", "next_obs", "actions", "valid", "return_to_go", *m.TD_KEYS)
    joint_batch = ab.batch({k: row[k] for k in keys}, setup.batch, stacked=True)
    obs = _rows(row["obs"], setup.batch)
    obs_z, cand = jax.eval_shape(partial(m.encode, nets, args), _unplaced(state["params"]), obs, jax.random.key(0))
    to_critic = lambda a, s: io.executed(io.to_model(a, s))  # a data chunk as the critic reads it
    chunk = jax.eval_shape(to_critic, _rows(row["actions"], 1), _rows(row["obs"]["state"], 1))
    cached = {k: row[k] for k in m.TD_KEYS}
    cached.update(obs_z=obs_z, chunk=chunk, next_obs_z=obs_z, next_cand=cand)
    critic_batch = ab.batch(cached, setup.batch, stacked=True)
    joint, critic_only = m.make_update(nets, args, tx, critic_tx)
    act, act_learn = m.make_act(nets, args, pi_tx)
    act_obs = ab.batch(row["obs"], setup.act_batch)
    bc_batch = ab.batch({k: row[k] for k in m.BC_KEYS}, setup.batch)
    tiled_obs = ab.batch(row["obs"], setup.act_batch * args.bon)  # every candidate with its own prefix pass
    own = dict(init=init, state=state)
    return [
        Case("acrlpd_pi0/joint_update", joint, (state, joint_batch, ab.key()), {}, setup.batch, **own),
        Case("acrlpd_pi0/critic_update", critic_only, (state, critic_batch, ab.key()), {}, setup.batch, **own),
        Case(
            f"acrlpd_pi0/act_bon{args.bon}",
            act,
            (state, act_obs, ab.key()),
            {"n": args.bon, "beta": 0.0},
            setup.act_batch,
            **own,
        ),
        Case(
            f"acrlpd_pi0/act_bon{args.bon}_recomputed",
            act,
            (state, tiled_obs, ab.key()),
            {"n": 1, "beta": 0.0},
            setup.act_batch,
            **own,
        ),  # the same chunks, one VLM pass per candidate (samples: obs)
        Case("acrlpd_pi0/act_learn", act_learn, (state, act_obs, bc_batch, ab.key()), {}, setup.act_batch, **own),
    ]


def chunk_awr_cases(setup: Setup, ab: Abstract) -> list[Case]:
    """chunk_awr (two-phase): the critic update (Q, V on precomputed views), the policy update (weighted flow
    matching, the whole π₀), and its acting function."""
    m = chunk_awr
    args = script_args(m, setup, batch_size=setup.batch, critic_batch_size=setup.batch)
    env = libero_env(setup.preset)
    model, io = policy(setup, env, args.action_horizon)
    cfg = model.config
    nets = m.Nets(model, io, m.MLP(tuple(args.critic_hidden)), m.MLP(tuple(args.critic_hidden)))
    z_width = cfg.vlm.width + (cfg.state_dim or cfg.action_dim)
    tx, critic_tx = m.make_optimizers(args)

    def init(key):  # as chunk_awr.main builds its state
        k_pi, k_q, k_v = jax.random.split(key, 3)
        params = model.init(k_pi)
        x = jnp.zeros((1, z_width + args.action_horizon * env.action_dim))
        q = jax.vmap(lambda k: nets.q.init(k, x)["params"])(jax.random.split(k_q, 2))
        critic = {"q": q, "v": nets.v.init(k_v, jnp.zeros((1, z_width)))["params"]}
        state = {"params": params, "opt": tx.init(params), "critic": critic, "critic_opt": critic_tx.init(critic)}
        state["ema"] = jax.tree.map(jnp.copy, params) if args.ema_decay > 0 else {}
        return {**state, "target_critic": q, "adv": jnp.zeros(270_000, jnp.float32)}  # LIBERO's ~270k chunks

    state = ab.state(init, jax.random.key(0))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    row = data.make_chunks(episode(env), args.action_horizon, args.gamma).get(np.array([0]))
    row = {k: v for k, v in row.items() if k not in ("rewards", "next_obs")}  # as main's `batches`: mc target
    critic_row = {**row, "obs": {"state": row["obs"]["state"]}, "obs_z": np.zeros((1, z_width), np.float32)}
    policy_row = {**row, "adv": np.zeros(1, np.float32)}
    updates = m.make_update(nets, args, tx, critic_tx, shardings)
    act_obs = ab.batch(row["obs"], setup.act_batch)
    act = m.make_act(nets, args)
    own = dict(init=init, state=state)
    critic_args = (state, ab.batch(critic_row, setup.batch, True), ab.key())
    policy_args = (state, ab.batch(policy_row, setup.batch, True), ab.key())
    return [
        Case("chunk_awr/critic_update", updates["critic"], critic_args, {}, setup.batch, **own),
        Case("chunk_awr/policy_update", updates["policy"], policy_args, {}, setup.batch, **own),
        Case(
            "chunk_awr/act",
            act,
            (state["params"], act_obs, ab.key()),
            {},
            setup.act_batch,
            **own,
            view=lambda st: st["params"],
        ),
    ]


def flow_ppo_cases(setup: Setup, ab: Abstract) -> list[Case]:
    """flow_ppo: one PPO update (one epoch of one minibatch of `batch` rows: the memory of a minibatch step) and the
    rollout's acting function (the stochastic chain, its log-likelihood, the value)."""
    m = flow_ppo
    args = script_args(m, setup, freeze_backbone=setup.freeze_backbone, num_minibatches=1, update_epochs=1)
    env = libero_env(setup.preset)
    model, io = policy(setup, env, args.action_horizon)
    cfg = model.config
    nets = m.Nets(model, io, m.NoiseHead(cfg.action_dim, args.min_std, args.max_std), m.ValueHead())

    def train_init(key):  # as flow_ppo.main builds its state
        k_pi, k_noise, k_value = jax.random.split(key, 3)
        heads = {"noise": nets.noise_head.init(k_noise, jnp.zeros((1, 1, args.action_horizon, cfg.expert.width)))}
        z = (jnp.zeros((1, cfg.vlm.width)), jnp.zeros((1, cfg.state_dim or cfg.action_dim)))
        return {"params": model.init(k_pi), "heads": {**heads, "value": nets.value_head.init(k_value, *z)}}

    tx, bc_tx = m.make_optimizers(args, nets, jax.eval_shape(train_init, jax.random.key(0)))

    def init(key):  # as flow_ppo.main starting from a π₀ checkpoint (no BC steps: no BC optimizer state)
        train = train_init(key)
        stats = {"mean": jnp.zeros(()), "var": jnp.ones(()), "count": jnp.zeros(())}  # --norm-value's
        return {**train, "opt": tx.init(train), "bc_opt": {}, "ema": {}, "ret_stats": stats}

    state = ab.state(init, jax.random.key(0))
    row = data.make_chunks(episode(env), args.action_horizon, args.gamma).get(np.array([0]))
    act = m.make_act(nets, args)[0]
    _, chain, sde_step, logp, value = jax.eval_shape(act, _unplaced(state), _rows(row["obs"], 1), jax.random.key(0))
    rollout = {"obs": row["obs"], "chain": chain, "sde_step": sde_step, "logp": logp, "values": value}
    rollout.update(advantages=logp, returns=logp)
    _, ppo_update = m.make_update(nets, args, tx, bc_tx)
    ppo_args = (state, ab.batch(rollout, setup.batch), ab.key(), ab.scalar(jnp.bool_))
    own = dict(init=init, state=state)
    return [
        Case("flow_ppo/ppo_update", ppo_update, ppo_args, {}, setup.batch, **own),
        Case("flow_ppo/act", act, (state, ab.batch(row["obs"], setup.act_batch), ab.key()), {}, setup.act_batch, **own),
    ]


def dsrl_cases(setup: Setup, ab: Abstract) -> list[Case]:
    """dsrl_pi0 online from a π₀ checkpoint (the libero config: no BC, π₀ frozen): the SAC update on cached views and
    noises, and acting (one prefix pass, the noise policy, π₀'s chain from its noise)."""
    m = dsrl_pi0
    args = script_args(m, setup)
    env = libero_env(setup.preset)
    model, io = policy(setup, env, args.action_horizon)
    cfg = model.config
    dims = args.action_horizon * cfg.action_dim
    nets = m.Nets(model, io, m.Critic(tuple(args.critic_hidden)), m.NoisePolicy(tuple(args.actor_hidden), dims))
    obs_dim = cfg.vlm.width + (cfg.state_dim or cfg.action_dim)
    _, sac_tx = m.make_optimizers(args, nets, jax.eval_shape(model.init, jax.random.key(0)))

    def init(key):  # as dsrl_pi0.main builds its state from a checkpoint
        k_pi, k_q, k_actor = jax.random.split(key, 3)
        q = jax.vmap(lambda k: nets.critic.init(k, jnp.zeros((1, obs_dim + dims)))["params"])
        sac = {"noise_critic": q(jax.random.split(k_q, args.num_qs)), "critic": {}, "log_alpha": jnp.zeros(())}
        sac["actor"] = nets.actor.init(k_actor, jnp.zeros((1, obs_dim)))["params"]
        state = {"params": model.init(k_pi), "opt": {}, "ema": {}, **sac}
        state.update({f"{k}_opt": sac_tx[k].init(sac[k]) for k in m.SAC_KEYS})
        return {**state, "target_critic": {}, "target_noise_critic": sac["noise_critic"]}

    state = ab.state(init, jax.random.key(0))
    row = data.make_chunks(episode(env), args.action_horizon, args.gamma).get(np.array([0]))
    cached = {k: row[k] for k in m.TD_KEYS}
    view = jax.ShapeDtypeStruct((1, obs_dim), jnp.float32)
    cached.update(
        obs_z=view, next_obs_z=view, noise=jax.ShapeDtypeStruct((1, args.action_horizon, cfg.action_dim), jnp.float32)
    )
    cached["chunk"] = jax.ShapeDtypeStruct((1, args.action_horizon, env.action_dim), jnp.float32)
    _, sac_update = m.make_update(nets, args, None, sac_tx)
    act = m.make_act(nets, args)
    own = dict(init=init, state=state)
    return [
        Case(
            "dsrl_pi0/sac_update",
            sac_update,
            (state, ab.batch(cached, setup.batch, stacked=True), ab.key()),
            {},
            setup.batch,
            **own,
        ),
        Case(
            "dsrl_pi0/act",
            act,
            (state, ab.batch(row["obs"], setup.act_batch), ab.key()),
            {"how": "sample"},
            setup.act_batch,
            **own,
        ),
    ]


def matmul_flops(case: Case) -> float:
    """The FLOPs of every matrix product a call of `case` runs (dot_general: 2·M·N·K; convolutions likewise), counted
    on its jaxpr with each scan body × its length and each remat's recomputation included where the jaxpr has it.
    XLA's cost analysis counts a while loop's body once, which undercounts a scanned 18-layer π₀ ~18-fold."""
    return _jaxpr_flops(case.fn.trace(*case.args, **case.kwargs).jaxpr.jaxpr)


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = np.prod([eqn.invars[0].aval.shape[i] for i in contract])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # the kernel: its size but the output features, per output element
            out = eqn.outvars[0].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * np.prod(out) * np.prod(rhs) / out_features
        subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        subs += [b for v in eqn.params.values() if isinstance(v, tuple) for b in v if hasattr(b, "jaxpr")]
        inner = [_jaxpr_flops(getattr(sub, "jaxpr", sub)) for sub in subs]
        if name == "cond":  # one branch runs
            total += max(inner, default=0.0)
        else:
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


CASES = {"acrlpd_pi0": acrlpd_cases, "chunk_awr": chunk_awr_cases, "flow_ppo": flow_ppo_cases, "dsrl_pi0": dsrl_cases}


def cases(script: str, setup: Setup) -> list[Case]:
    """The full-size functions of `script` under `setup`, on the first `setup.devices` devices."""
    return CASES[script](setup, Abstract(setup.devices))
