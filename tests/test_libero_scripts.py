"""`--env libero` end to end: each script's `main` on a tiny LIBERO dataset recorded from the simulator (conftest's
`libero_demo`), with the real simulator for rollouts and evaluation, rendered 32x32 camera images, and the CPU π₀.

Skipped when the `libero` extra is not installed (pip install -e ".[libero]").
"""

import io
import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("libero")

import acrlpd_pi0  # noqa: E402
import chunk_awr  # noqa: E402
import flow_ppo  # noqa: E402
from common import envs, pi0  # noqa: E402

# One task, 8-step episodes, one settling step, the simulators in this process (no worker start-up; test_libero.py
# covers the worker processes). Values as on the command line (`--env-kwargs task_ids [0] max_episode_steps 8 ...`),
# decoded as JSON by envs.make_spec.
ENV_KW = {"task_ids": "[0]", "max_episode_steps": "8", "num_steps_wait": "1", "async_envs": "false"}
CAMERAS = ["base_0_rgb", "left_wrist_0_rgb"]


@pytest.fixture
def seen(monkeypatch):
    """What reaches π₀: the model's cameras, the observation's image shapes and state width, and the prompts."""
    out = {"cameras": set(), "images": set(), "state_dims": set(), "prompts": []}
    make_observation, make_prompt_table = pi0.make_observation, pi0.make_prompt_table

    def observation(config, obs, *a, **kw):
        out["cameras"].add(tuple(config.cameras))
        out["images"] |= {(cam, tuple(np.shape(img)[-3:])) for cam, img in obs["images"].items()}
        out["state_dims"].add(np.shape(obs["state"])[-1])
        return make_observation(config, obs, *a, **kw)

    def prompt_table(prompts, tokenizer):
        out["prompts"] += list(prompts)
        return make_prompt_table(prompts, tokenizer)

    monkeypatch.setattr(pi0, "make_observation", observation)
    monkeypatch.setattr(pi0, "make_prompt_table", prompt_table)
    return out


def check_run(run_dir: str, seen: dict, demo, keys: tuple[str, ...], env_kwargs=ENV_KW) -> list[dict]:
    """Finite losses in metrics.jsonl, an evaluation, LIBERO's inputs in π₀'s observations."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for k in keys:
        values = [r[k] for r in rows if k in r]
        assert values and all(math.isfinite(v) for v in values), k
    assert any("eval/success_rate" in r for r in rows)
    assert json.load(open(os.path.join(run_dir, "args.json")))["env_kwargs"] == env_kwargs
    assert seen["cameras"] == {tuple(CAMERAS)}  # the CPU preset built with LIBERO's two cameras
    assert seen["images"] == {(cam, (demo.size, demo.size, 3)) for cam in CAMERAS}  # data and env at 32x32
    assert seen["state_dims"] == {8} and demo.demo["language"] in seen["prompts"]
    return rows


def test_dataset_image_size_sets_the_render_size(libero_demo):
    assert envs.dataset_image_size(libero_demo.dir) == envs.dataset_image_size(libero_demo.file) == libero_demo.size
    env = envs.make_spec("libero", ENV_KW, libero_demo.dir).make(1, seed=0, evaluation=True)
    try:
        assert env.image_size == libero_demo.size and env.eval_mode and env.max_episode_steps == 8
        assert (env.task_ids, env.num_steps_wait, env.action_dim, env.state_dim) == ([0], 1, 7, 8)
    finally:
        env.close()


@pytest.mark.slow  # ~70 s: the real LIBERO simulator built and rendered for the online phase and two evaluations
def test_acrlpd_pi0(libero_demo, tmp_path, seen):
    run_dir = str(tmp_path / "run")
    args = acrlpd_pi0.Args(
        env="libero",
        env_kwargs=ENV_KW,
        dataset=libero_demo.dir,
        run_dir=run_dir,
        offline_steps=2,  # one joint update call, the prior data encoded for the critic, then 2 chunk steps in the
        online_steps=4,  # simulator, each followed by 2 critic updates
        model_horizon=10,  # π₀ predicts 10 actions, the first 4 are executed (openpi's pi0_libero: 50 and 5)
        action_horizon=4,
        utd=2,
        learning_starts=0,
        batch_size=4,
        online_batch_size=4,
        num_envs=1,
        eval_episodes=1,
        buffer_size=64,
        log_every=2,
        num_qs=2,
        critic_hidden=(16,),
        bon=2,
        target_n=2,
        target_flow_steps=2,
        flow_steps=2,
        act_pessimism=0.0,  # two evaluations (best-of-N, plain π₀) instead of three
    )
    out = acrlpd_pi0.main(args)
    assert out["step"] == 6 and "online/eval/success_rate" in out and "online/eval/plain_success_rate" in out
    check_run(run_dir, seen, libero_demo, ("losses/bc", "losses/critic", "charts/q_target"))
    with np.load(os.path.join(run_dir, "host", "6.p0.npz")) as z:  # the online chunks: 7-D actions, the critic's view
        buf = {k[7:]: z[k] for k in z.files if k.startswith("buffer/")}
    assert not any(k.startswith(("obs/", "next_obs/")) for k in buf)  # no camera images: never read online
    assert buf["actions"].shape == (2, 4, 7) and buf["extras/obs_z"].shape[0] == 2
    assert buf["extras/next_cand"].shape == (2, 2, 4, 7)  # the critic's cache: 2 π₀ chunks at o_{t+H}, executed part


def write_lerobot(folder, demo: dict, episodes: int = 2) -> str:
    """The recorded demo as a LeRobot dataset in the layout of openpi's physical-intelligence/libero: parquet rows
    with upright PNG images (`image`, `wrist_image`), 8-D `state`, 7-D `actions`; tasks in meta/tasks.jsonl."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    from PIL import Image

    def png(img):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img[::-1, ::-1])).save(buf, format="PNG")  # LIBERO renders upside down
        return {"bytes": buf.getvalue(), "path": None}

    os.makedirs(os.path.join(folder, "meta"))
    os.makedirs(os.path.join(folder, "data", "chunk-000"))
    with open(os.path.join(folder, "meta", "tasks.jsonl"), "w") as f:
        f.write(json.dumps({"task_index": 0, "task": demo["language"]}) + "\n")
    state = np.concatenate([demo["ee_pos"], demo["ee_ori"], demo["gripper_states"]], 1).astype(np.float32)
    n = len(state)
    for ep in range(episodes):
        table = {
            "image": [png(x) for x in demo["agentview_rgb"]],
            "wrist_image": [png(x) for x in demo["eye_in_hand_rgb"]],
            "state": state.tolist(),
            "actions": demo["actions"].astype(np.float32).tolist(),
            "episode_index": np.full(n, ep),
            "frame_index": np.arange(n),
            "task_index": np.zeros(n, np.int64),
        }
        pq.write_table(pa.table(table), os.path.join(folder, "data", "chunk-000", f"episode_{ep:06d}.parquet"))
    return str(folder)


def test_chunk_awr(libero_demo, tmp_path, seen):
    """From a LeRobot folder (openpi's LIBERO data format) as --dataset, read at the env's image size."""
    run_dir = str(tmp_path / "run")
    env_kwargs = {**ENV_KW, "image_size": str(libero_demo.size)}
    args = chunk_awr.Args(
        env="libero",
        env_kwargs=env_kwargs,
        dataset=write_lerobot(tmp_path / "lerobot", libero_demo.demo),
        run_dir=run_dir,
        critic_steps=2,
        policy_steps=2,
        updates_per_call=2,
        batch_size=4,
        critic_batch_size=4,
        critic_hidden=(16,),
        num_envs=1,
        eval_episodes=1,
        log_every=1,
    )
    out = chunk_awr.main(args)
    assert out["step"] == 4 and out["policy_updates"] == 2 and 0.0 <= out["eval/success_rate"] <= 1.0
    check_run(run_dir, seen, libero_demo, ("losses/q", "losses/v", "losses/policy"), env_kwargs)


def test_flow_ppo(libero_demo, tmp_path, seen):
    run_dir = str(tmp_path / "run")
    args = flow_ppo.Args(
        env="libero",
        env_kwargs=ENV_KW,
        dataset=libero_demo.dir,
        run_dir=run_dir,
        bc_steps=2,
        bc_batch_size=4,
        iterations=1,
        num_envs=1,
        num_steps=2,  # 2 chunks of 5 steps: one 8-step episode, truncated inside its second chunk
        num_minibatches=1,
        update_epochs=1,
        critic_warmup=0,  # the first iteration updates the policy too
        eval_episodes=1,
        eval_every=1,
        log_every=1,
        flow_steps=2,
    )
    out = flow_ppo.main(args)
    assert out["charts/env_steps"] == 2 * 5 and "eval/start_success_rate" in out
    check_run(run_dir, seen, libero_demo, ("losses/bc", "losses/policy", "losses/value"))
