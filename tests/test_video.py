"""Evaluation videos (--capture-video: push and gymnasium frames, the MP4s a run writes, the missing-writer error) and
the curves of run folders (common.plot)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny  # noqa: E402

from common import RunError, envs, plot, video  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PI0RL_DATA", str(tmp_path_factory.getbasetemp() / "data"))


def decode(path: str) -> tuple[int, tuple[int, int], np.ndarray]:
    """(frame count, (width, height), first frame [h,w,3]) of an MP4, decoded by the video extra's ffmpeg to PPM
    images (each with its own size in its header)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", path, "-f", "image2pipe", "-c:v", "ppm", "-"]
    data = subprocess.run(cmd, capture_output=True, check=True).stdout
    frames, sizes, at = [], set(), 0
    while at < len(data):
        magic, w, h, top = data[at : at + 64].split(maxsplit=4)[:4]
        assert magic == b"P6" and top == b"255"
        start = at + len(b" ".join([magic, w, h, top])) + 1
        w, h = int(w), int(h)
        frames.append(np.frombuffer(data[start : start + w * h * 3], np.uint8).reshape(h, w, 3))
        sizes.add((w, h))
        at = start + w * h * 3
    assert len(sizes) == 1
    return len(frames), sizes.pop(), frames[0]


def still(obs, key):  # a policy that never moves: every episode runs to its time limit
    return np.zeros((len(obs["state"]), 5, 2), np.float32), None


def test_push_video(tmp_path):
    """The recorded push episodes: the first observation and one frame per step (a truncated episode: 80 + 1) at
    128², written as MP4 with a bar under each frame; the evaluation's numbers do not change."""
    spec = envs.make_spec("push", {})
    where = dict(episodes=3, num_envs=3, seed=0, horizon=5)
    plain, none = envs.evaluate(spec, still, jax.random.key(0), **where)
    out, trace = envs.evaluate(spec, still, jax.random.key(0), record=2, **where)
    assert out == plain and none.videos == [] and len(trace.videos) == 2
    np.testing.assert_array_equal(trace.rewards, none.rewards)
    for frames, success, length in trace.videos:
        assert frames.shape == (81, 128, 128, 3) and frames.dtype == np.uint8 and not success and length == 80
    paths = video.write_videos(str(tmp_path), 200, "bon8", trace.videos)
    assert [os.path.basename(p) for p in paths] == ["step000200_bon8_ep0_fail.mp4", "step000200_bon8_ep1_fail.mp4"]
    n, size, first = decode(paths[0])
    assert n == 81 and size == (128, 144)  # 128² and the 16-pixel bar
    assert np.abs(first[:128].astype(int) - trace.videos[0][0][0]).mean() < 8  # the drawing, through H.264
    red = first[130:142, 4:12].mean((0, 1))  # the outcome square: red for a failure
    assert red[0] > 150 and red[1] < 100


def test_gym_video(tmp_path):
    """A gymnasium env (Pendulum-v1, in a worker process) made with render_mode="rgb_array" only when recording: its
    first env's episode, 200 steps + 1 frames of render() at every 2nd pixel (500² -> 250²)."""
    spec = envs.make_spec("Pendulum-v1", {})
    act = lambda obs, key: (np.zeros((len(obs["state"]), 5, 1), np.float32), None)
    where = dict(episodes=2, num_envs=2, seed=0, horizon=5)
    try:
        _, none = envs.evaluate(spec, act, jax.random.key(0), **where)
        _, trace = envs.evaluate(spec, act, jax.random.key(0), record=1, **where)
        assert none.videos == [] and len(spec.kept) == 2  # kept apart: envs made with and without a render mode
    finally:
        spec.close()
    ((frames, success, length),) = trace.videos
    assert frames.shape == (201, 250, 250, 3) and length == 200 and not success
    (path,) = video.write_videos(str(tmp_path), 7, "pi0", trace.videos)
    n, size, _ = decode(path)
    assert n == 201 and size == (250, 266)


@pytest.mark.parametrize("script", ["acrlpd_pi0", "chunk_awr", "flow_ppo"])
def test_missing_writer(script, monkeypatch, tmp_path):
    """--capture-video without the video extra: one line that says what to install, before the run folder exists."""
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` now fails
    mod = importlib.import_module(script)
    run_dir = str(tmp_path / "run")
    with pytest.raises(RunError, match=re.escape("imageio_ffmpeg is not installed): pip install -e '.[video]'")):
        mod.main(mod.Args(capture_video=True, run_dir=run_dir))
    assert not os.path.exists(run_dir)


@pytest.mark.slow  # ~17 s: two tiny runs recording videos, the plot from the shell
def test_tiny_runs_videos_and_plot(tmp_path, small_push):
    """Two seeds of the tiny flow_ppo.py run with --capture-video (the second with --track): the first 2 episodes of
    every evaluation as MP4 named by step, policy and outcome, and in wandb; then common.plot of the two folders (one
    config, two seeds: a band)."""
    import flow_ppo

    runs = [str(tmp_path / f"run{seed}") for seed in (1, 2)]
    for seed, run_dir in zip((1, 2), runs, strict=True):
        flags = dict(dataset=small_push, run_dir=run_dir, seed=seed, track=seed == 2, capture_video=True)
        flow_ppo.main(flow_ppo.Args(**tiny.FLOW_PPO, **flags))
    logged = [f for _, _, files in os.walk(os.path.join(runs[1], "wandb")) for f in files if f.endswith(".mp4")]
    assert len(logged) == len(os.listdir(os.path.join(runs[1], "videos")))
    with open(os.path.join(runs[0], "metrics.jsonl")) as f:
        evals = [r["step"] for r in map(json.loads, f) if "eval/success_rate" in r]
    names = sorted(os.listdir(os.path.join(runs[0], "videos")))
    assert len(names) == 2 * len(evals) and all(
        re.fullmatch(r"step\d{6}_pi0_ep[01]_(success|fail)\.mp4", n) for n in names
    )
    assert {int(n[4:10]) for n in names} == set(evals)
    n, size, _ = decode(os.path.join(runs[0], "videos", names[0]))
    assert size == (128, 144) and (n == 81 if names[0].endswith("_fail.mp4") else 2 <= n <= 81)
    groups = plot.configs([plot.read_run(d) for d in runs])
    assert [len(rs) for rs in groups.values()] == [2]  # the two seeds are one config
    out = str(tmp_path / "plot.png")
    done = subprocess.run([sys.executable, "-m", "common.plot", *runs, "--out", out], cwd=ROOT, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    from PIL import Image

    assert os.path.getsize(out) > 10_000 and Image.open(out).size[0] > 500


def test_plot_errors(tmp_path, monkeypatch):
    """A folder without metrics.jsonl, and matplotlib missing: one line each (the CLI prints it, exit status 2)."""
    with pytest.raises(RunError, match="no metrics.jsonl"):
        plot.plot([str(tmp_path)])
    done = subprocess.run(
        [sys.executable, "-m", "common.plot", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path}: no metrics.jsonl, so not a run folder of these scripts (runs/<env>__<name>__...)"
    ]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "losses/bc": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RunError, match=re.escape("needs matplotlib: pip install -e '.[video]'")):
        plot.plot([str(tmp_path)])
