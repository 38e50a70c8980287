"""`--env libero` end to end, as an openpi user runs it: no data, checkpoint or tokenizer flags. Each script finds
them where openpi and LeRobot cache them (`openpi.located`): a tiny π₀ / π₀.₅ in openpi's checkpoint layout at
$OPENPI_DATA_HOME/openpi-assets/checkpoints/{pi0,pi05}_libero, a SentencePiece model trained here at
$OPENPI_DATA_HOME/big_vision/paligemma_tokenizer.model, and the LIBERO demo recorded from the simulator (conftest's
`libero_demo`) as a LeRobot folder at $HF_LEROBOT_HOME/physical-intelligence/libero; the real simulator for rollouts
and evaluation, rendered 32x32.

Skipped when the `libero` extra is not installed (pip install -e ".[libero]").
"""

import io
import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("libero")

from conftest import host_file, robot_sentences, train_sentencepiece, write_openpi_checkpoint  # noqa: E402

import acrlpd_pi0  # noqa: E402
import chunk_awr  # noqa: E402
import dsrl_pi0  # noqa: E402
import flow_ppo  # noqa: E402
from common import RunError, envs, libero, openpi, pi0, runlog  # noqa: E402

# One task, 8-step episodes, one settling step, the simulators in this process (no worker start-up; test_libero.py
# covers the worker processes), rendered without multisampling and reflections (faster in software OpenGL).
# Values as on the command line (`--env-kwargs task_ids [0] max_episode_steps 8 ...`), decoded as JSON by
# envs.make_spec.
ENV_KW = {
    "task_ids": "[0]",
    "max_episode_steps": "8",
    "num_steps_wait": "1",
    "async_envs": "false",
    "fast_render": "true",
}
ENV_32 = {**ENV_KW, "image_size": "32"}  # renders at the tiny checkpoint's and the data's size
# the online phase of acrlpd_pi0's and dsrl_pi0's LIBERO tests: 2 chunk steps in the simulator, each followed by 2
# critic updates; π₀ predicts 10 actions, the first 4 are executed (openpi's pi0_libero: 50 and 5)
ONLINE_32 = dict(
    env_kwargs=ENV_32,
    online_steps=4,
    utd=2,
    learning_starts=0,
    model_horizon=10,
    action_horizon=4,
    online_batch_size=4,
    num_envs=1,
    eval_episodes=1,
    buffer_size=64,
    log_every=2,
    critic_hidden=(16,),
    flow_steps=2,
)
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

    def prompt_table(prompts, tokenizer, state_in_prompt=False):
        out["prompts"] += list(prompts)
        out["state_in_prompt"] = state_in_prompt
        return make_prompt_table(prompts, tokenizer, state_in_prompt)

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


def tiny_openpi_config(pi05: bool) -> pi0.Pi0Config:
    """openpi's π₀ / π₀.₅ shape at toy sizes: three cameras through a SigLIP (32 px, patch 8), 8 action dims."""
    vit = pi0.SigLIPConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, image_size=32)
    return pi0.make_config("cpu", pi05=pi05, cameras=pi0.CAMERAS, vit=vit, vocab_size=320, action_dim=8, state_dim=None)


@pytest.fixture(scope="session")
def caches(once, libero_demo) -> dict:
    """openpi's and LeRobot's caches as an openpi user has them after openpi's LIBERO example: the environment
    variables that point at them (set with monkeypatch by each test). Made once per test session."""
    return once("libero_caches", lambda root: make_caches(root, libero_demo.demo))


def make_caches(root, demo: dict) -> dict:
    openpi, lerobot = root / "openpi", root / "lerobot"
    rng = np.random.default_rng(0)
    train_sentencepiece(openpi / "big_vision" / "paligemma_tokenizer.model", robot_sentences(rng), vocab_size=320)
    stat = lambda d: {
        "mean": rng.normal(0, 0.1, d),
        "std": rng.uniform(0.5, 1, d),
        "q01": -np.ones(d),
        "q99": np.ones(d),
    }
    for name, pi05 in (("pi0_libero", False), ("pi05_libero", True)):
        folder = openpi / "openpi-assets" / "checkpoints" / name
        write_openpi_checkpoint(
            folder, tiny_openpi_config(pi05), {"state": stat(8), "actions": stat(7)}, "physical-intelligence/libero"
        )
    write_lerobot(lerobot / "physical-intelligence" / "libero", demo)
    return {"OPENPI_DATA_HOME": str(openpi), "HF_LEROBOT_HOME": str(lerobot)}


@pytest.fixture
def in_caches(caches, monkeypatch) -> dict:
    for k, v in caches.items():
        monkeypatch.setenv(k, v)
    return caches


def test_located_lists_every_path_and_uses_default_cache_paths(tmp_path, monkeypatch, caches):
    """Nothing cached: one RunError naming each path looked at and the flag for it. Caches under HOME (the defaults
    ~/.cache/openpi and ~/.cache/huggingface/lerobot): found without any variable."""
    for k in ("OPENPI_DATA_HOME", "HF_LEROBOT_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = runlog.configured(acrlpd_pi0.CONFIGS, "libero")
    with pytest.raises(RunError) as err:
        openpi.located(args, data_with_checkpoint="optional")
    msg = str(err.value)
    assert "\n" not in msg and msg.count("looked at") == 2  # the checkpoint, and the data (optional only with one)
    assert f"--pi0-checkpoint (looked at: {tmp_path}/.cache/openpi/openpi-assets/checkpoints/pi0_libero)" in msg
    assert f"--dataset (looked at: {tmp_path}/.cache/huggingface/lerobot/physical-intelligence/libero, " in msg
    assert "hub/datasets--physical-intelligence--libero/snapshots/*" in msg and "OPENPI_DATA_HOME" in msg
    with pytest.raises(RunError, match=f"--dataset \\(looked at: {tmp_path}/.cache/huggingface/lerobot/physical"):
        openpi.located(chunk_awr.Args(env="libero", pi0_preset="cpu"), data_with_checkpoint="needed")
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    os.symlink(caches["OPENPI_DATA_HOME"], tmp_path / ".cache" / "openpi")
    os.symlink(caches["HF_LEROBOT_HOME"], tmp_path / ".cache" / "huggingface" / "lerobot")
    found = openpi.located(chunk_awr.Args(env="libero", pi0_preset="pi05"), data_with_checkpoint="needed")
    assert found.pi0_checkpoint == f"{tmp_path}/.cache/openpi/openpi-assets/checkpoints/pi05_libero"
    assert found.tokenizer == f"{tmp_path}/.cache/openpi/big_vision/paligemma_tokenizer.model"
    assert found.dataset == f"{tmp_path}/.cache/huggingface/lerobot/physical-intelligence/libero"
    assert found.model_horizon == 10  # openpi's pi05_libero chunk
    assert openpi.located(acrlpd_pi0.Args(), data_with_checkpoint="optional").pi0_preset == "cpu"  # push: nothing


def test_dataset_image_size_sets_the_render_size(libero_demo):
    assert libero.dataset_image_size(libero_demo.dir) == libero.dataset_image_size(libero_demo.file) == libero_demo.size
    env = envs.make_spec("libero", ENV_KW, libero_demo.dir).make(1, seed=0, evaluation=True)
    try:
        assert env.image_size == libero_demo.size and env.eval_mode and env.max_episode_steps == 8
        assert (env.task_ids, env.num_steps_wait, env.action_dim, env.state_dim) == ([0], 1, 7, 8)
    finally:
        env.close()


@pytest.mark.slow  # ~70 s: the real LIBERO simulator built and rendered for the online phase and two evaluations
def test_acrlpd_pi0(libero_demo, tmp_path, seen, in_caches):
    """openpi's pi0_libero, its tokenizer and the LeRobot data from the caches: offline, then online."""
    run_dir = str(tmp_path / "run")
    args = runlog.configured(
        acrlpd_pi0.CONFIGS,
        "libero",
        **ONLINE_32,
        run_dir=run_dir,
        offline_steps=2,  # one joint update call, the prior data encoded for the critic, then ONLINE_32's online phase
        batch_size=4,
        num_qs=2,
        bon=2,
        target_n=2,
        target_flow_steps=2,
        act_pessimism=0.0,  # two evaluations (best-of-N, plain π₀) instead of three
    )
    out = acrlpd_pi0.main(args)
    assert out["step"] == 6 and "online/eval/success_rate" in out and "online/eval/plain_success_rate" in out
    check_run(run_dir, seen, libero_demo, ("losses/bc", "losses/critic", "charts/q_target"), ENV_32)
    used = json.load(open(os.path.join(run_dir, "args.json")))  # what was found, recorded for a resume
    assert used["pi0_checkpoint"] == os.path.join(in_caches["OPENPI_DATA_HOME"], "openpi-assets/checkpoints/pi0_libero")
    assert used["tokenizer"] == os.path.join(in_caches["OPENPI_DATA_HOME"], "big_vision/paligemma_tokenizer.model")
    assert used["dataset"] == os.path.join(in_caches["HF_LEROBOT_HOME"], "physical-intelligence/libero")
    assert used["pi0_preset"] == "pi0" and seen["state_in_prompt"] is False
    buf = {k[7:]: v for k, v in host_file(run_dir).items() if k.startswith("buffer/")}  # the critic's view only
    assert not any(k.startswith(("obs/", "next_obs/")) for k in buf)  # no camera images: never read online
    assert sorted(buf) == [
        "discounted_return",
        "extras/chunk",
        "extras/next_cand",
        "extras/next_obs_z",
        "extras/obs_z",
        "mask",
        "n_valid",
        "next",
    ]
    assert buf["extras/chunk"].shape == (2, 4, 7) and buf["extras/obs_z"].shape[0] == 2
    assert buf["extras/next_cand"].shape == (2, 2, 4, 7)  # the critic's cache: 2 π₀ chunks at o_{t+H}, executed part


@pytest.mark.slow  # ~60 s: the real LIBERO simulator built and rendered for the online phase and two evaluations
def test_dsrl_pi0(libero_demo, tmp_path, seen, in_caches):
    """openpi's pi0_libero steered as the libero config runs it: no BC, π₀ frozen, the noise policy learned online."""
    run_dir = str(tmp_path / "run")
    args = runlog.configured(dsrl_pi0.CONFIGS, "libero", **ONLINE_32, run_dir=run_dir, actor_hidden=(16,))
    out = dsrl_pi0.main(args)
    assert out["step"] == 4 and "online/eval/success_rate" in out and "start/eval/plain_success_rate" in out
    check_run(run_dir, seen, libero_demo, ("losses/noise_critic", "losses/actor", "charts/q_target"), ENV_32)
    used = json.load(open(os.path.join(run_dir, "args.json")))
    assert used["offline_steps"] == 0 and used["pi0_checkpoint"].endswith("checkpoints/pi0_libero")
    buf = {k[7:]: v for k, v in host_file(run_dir).items() if k.startswith("buffer/")}
    assert not any(k.startswith(("obs/", "next_obs/")) for k in buf)  # no camera images: never read online
    assert buf["extras/noise"].shape == (2, 4, 8) and buf["extras/chunk"].shape == (2, 4, 7)  # π₀'s 8 dims, env's 7


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


@pytest.mark.slow  # ~65 s under the suite's load: openpi's π₀.₅ layout loaded, both phases compiled, LIBERO evaluation
def test_chunk_awr(libero_demo, tmp_path, seen, in_caches):
    """openpi's pi05_libero from the cache, told to read its state from the prompt (openpi's pi05 default), on the
    cached LeRobot data (openpi's LIBERO data format) read at the env's image size."""
    run_dir = str(tmp_path / "run")
    args = runlog.configured(
        chunk_awr.CONFIGS,
        "libero",
        env_kwargs=ENV_32,
        pi0_preset="pi05",
        discrete_state=True,
        action_horizon=5,  # of pi05_libero's 10 (found): Q reads 5-step chunks, flow matching trains the first 5
        run_dir=run_dir,
        critic_steps=2,
        policy_steps=2,
        updates_per_call=2,
        batch_size=4,
        critic_batch_size=4,
        critic_hidden=(16,),
        eval_envs=1,
        eval_episodes=1,
        log_every=1,
    )
    out = chunk_awr.main(args)
    assert out["step"] == 4 and out["policy_updates"] == 2 and 0.0 <= out["eval/success_rate"] <= 1.0
    check_run(run_dir, seen, libero_demo, ("losses/q", "losses/v", "losses/policy"), ENV_32)
    assert seen["state_in_prompt"] is True  # π₀.₅'s prompts assembled with the state, inside jit
    used = json.load(open(os.path.join(run_dir, "args.json")))
    assert used["pi0_checkpoint"].endswith("pi05_libero") and used["model_horizon"] == 10


@pytest.mark.slow  # ~35 s: openpi's pi0_libero loaded, PPO compiled, the real simulator
def test_flow_ppo(libero_demo, tmp_path, seen, in_caches):
    """openpi's pi0_libero from the cache: PPO from it, no BC, so no data looked for."""
    run_dir = str(tmp_path / "run")
    args = runlog.configured(
        flow_ppo.CONFIGS,
        "libero",
        env_kwargs=ENV_32,
        run_dir=run_dir,
        model_horizon=10,  # π₀ predicts 10 actions, the first 5 are executed and enter the chains' likelihood
        action_horizon=5,
        logprob_reduce="sum",
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
    # the first ratio is 1: stored and recomputed chains agree (a summed float32 log-likelihood over 5×7 action
    # entries and 2 denoising steps from two XLA programs: ~1e-5 apart; a chain that differs is off by far more)
    assert out["charts/first_ratio_dev_max"] < 1e-4
    check_run(run_dir, seen, libero_demo, ("losses/policy", "losses/value"), ENV_32)
    used = json.load(open(os.path.join(run_dir, "args.json")))
    assert used["pi0_checkpoint"].endswith("pi0_libero") and used["dataset"] is None
