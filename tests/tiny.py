"""The tiny runs that the script tests share, in-process (tests/test_<script>.py) and from the command line
(tests/test_reliability.py): the same flags and data give the same XLA programs, so the persistent compilation cache
compiles each once per suite. Each also sets flags the defaults leave off, so that they are run somewhere. acrlpd's,
chunk_awr's and dsrl's play 10-step episodes (resets and time limits inside the runs; tests/test_multihost.py runs them
on 2 processes and compares with these)."""

import hashlib
import os

SHORT = {"max_episode_steps": "10"}  # --env-kwargs max_episode_steps 10
ACRLPD = dict(
    env_kwargs=SHORT,
    offline_steps=8,
    online_steps=8,
    batch_size=8,
    online_batch_size=8,
    updates_per_call=4,
    utd=2,
    learning_starts=4,
    eval_episodes=3,
    num_envs=2,
    log_every=4,
    save_every=4,
    num_qs=3,
    critic_hidden=(16,),
    target_n=2,
    bon=3,
    target_flow_steps=2,
    flow_steps=2,
    q_agg="min2",
    cql_weight=0.1,
    freeze_backbone=True,
    bon_slice=1,
    topk=2,
    adapt_temp=0.1,
)
CHUNK_AWR = dict(
    env_kwargs=SHORT,
    critic_steps=10,
    policy_steps=10,
    eval_episodes=2,
    eval_envs=2,
    batch_size=8,
    critic_batch_size=16,
    updates_per_call=5,
    log_every=5,
    eval_every=5,
    save_every=5,
    reward="subgoal",
    critic_target="td",
    ema_decay=0.8,
    eval_raw=True,
    beta=5.0,
    max_weight=10.0,
    remat="dots_saveable",
)
FLOW_PPO = dict(
    bc_steps=3,
    bc_batch_size=8,
    iterations=4,
    num_envs=4,
    num_steps=2,
    update_epochs=1,
    num_minibatches=2,
    eval_episodes=4,
    log_every=1,
    eval_every=2,
    save_every=1,
    critic_warmup=1,
    flow_steps=2,
    noise_method="flow_sde",
    freeze_backbone=False,
    dual_clip=3.0,
)
DSRL = dict(
    env_kwargs=SHORT,
    offline_steps=8,
    online_steps=8,
    batch_size=8,
    online_batch_size=8,
    updates_per_call=4,
    utd=2,
    learning_starts=4,
    eval_episodes=3,
    num_envs=2,
    log_every=4,
    save_every=4,
    num_qs=3,
    critic_hidden=(16,),
    actor_hidden=(16,),
    flow_steps=2,
    critic="aliased",
    alias_n=3,
    noise_scale=1.2,
    online_fraction=0.5,
    q_agg="mean",
    ema_decay=0.8,
)
RUNS = {"acrlpd_pi0": ACRLPD, "chunk_awr": CHUNK_AWR, "flow_ppo": FLOW_PPO, "dsrl_pi0": DSRL}


def flags(args: dict) -> list[str]:
    """Args fields as command-line flags: {"num_qs": 3, "critic_hidden": (16,), "freeze_backbone": False,
    "env_kwargs": {"max_episode_steps": "10"}} -> --num-qs 3 --critic-hidden 16 --no-freeze-backbone --env-kwargs
    max_episode_steps 10."""
    out = []
    for k, v in args.items():
        name = k.replace("_", "-")
        if isinstance(v, bool):
            out.append(f"--{name}" if v else f"--no-{name}")
        elif isinstance(v, dict):
            out += [f"--{name}", *(str(x) for kv in v.items() for x in kv)]
        else:
            out += [f"--{name}", *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    return out


def snapshot(folder: str) -> dict:
    """Every file under `folder`: size, modification time and content hash."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns, hashlib.sha1(open(p, "rb").read()).hexdigest())
    return out


def last_state(run_dir: str) -> dict:
    """The train state of a run folder's last checkpoint, as numpy arrays."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(run_dir, "checkpoints")) as mgr:
        out = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return out["state"]
