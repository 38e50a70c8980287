"""Evaluation videos (`--capture-video`): the frames an evaluation recorded (`envs.EvalTrace.videos`), a bar under
each saying the update, the episode's step and its outcome, written as MP4 (H.264) by imageio-ffmpeg, whose wheel
ships its ffmpeg: the `video` extra, imported only when a run asks for videos."""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Any

import numpy as np

from common import RunError

Obs = dict[str, Any]

INSTALL = "pip install -e '.[video]'"
SUCCESS, FAILURE, BAR = (40, 190, 70), (220, 40, 40), (40, 40, 40)


def require_writer() -> None:
    """Refuse (RunError, one line) before any work when the MP4 writer or the text drawing cannot be imported."""
    try:
        import imageio_ffmpeg  # noqa: F401
        import PIL.ImageDraw  # noqa: F401
    except ImportError as e:
        raise RunError(f"--capture-video needs a video writer ({e.name} is not installed): {INSTALL}") from None


def annotate(frames: np.ndarray, success: bool, step: int) -> np.ndarray:
    """frames [T,h,w,3] uint8 with a dark bar under each: a square green for a success, red for a failure, then the
    update `step`, the frame's episode step t and the outcome; padded to even sides (H.264's 4:2:0 chroma)."""
    from PIL import Image, ImageDraw

    T, h, w, _ = frames.shape
    bar = max(16, h // 16)
    H, W = h + bar + (h + bar) % 2, w + w % 2
    out = np.zeros((T, H, W, 3), np.uint8)
    out[:, :h, :w] = frames
    out[:, h:] = BAR
    out[:, h + 2 : H - 2, 2 : bar - 2] = SUCCESS if success else FAILURE
    outcome = "success" if success else "fail"
    for t in range(T):
        img = Image.fromarray(out[t, h:])
        ImageDraw.Draw(img).text((bar + 2, (bar - 11) // 2), f"upd {step} t {t} {outcome}", fill=(255, 255, 255))
        out[t, h:] = np.asarray(img)
    return out


def write_mp4(path: str, frames: np.ndarray, fps: int = 20) -> None:
    """frames [T,H,W,3] uint8 (even H and W) as an H.264 MP4 at `path`, atomically (a temporary file, then
    `os.replace`), by imageio-ffmpeg's ffmpeg in a session of its own (Ctrl-C reaches the script alone)."""
    import imageio_ffmpeg

    T, H, W, _ = frames.shape
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    raw = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-r", str(fps), "-i", "-"]
    h264 = ["-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23", "-f", "mp4", tmp]
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *raw, *h264]
    try:
        done = subprocess.run(
            cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, start_new_session=True
        )
        if done.returncode:
            raise RunError(f"writing {path} failed: ffmpeg says {done.stderr.decode(errors='replace').strip()[-300:]}")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_videos(
    folder: str, step: int, policy: str, videos: list[tuple[np.ndarray, bool, int]], fps: int = 20
) -> list[str]:
    """Each (frames, success, length) of `videos` annotated and written as
    <folder>/step<step>_<policy>_ep<i>_<success|fail>.mp4; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (frames, success, _) in enumerate(videos):
        path = os.path.join(folder, f"step{step:06d}_{policy}_ep{i}_{'success' if success else 'fail'}.mp4")
        write_mp4(path, annotate(frames, success, step), fps)
        paths.append(path)
    return paths


class Recorder:
    """`env` whose envs 0..count−1 draw their first episode (`render_frames`): its first observation, then one frame
    per step they take, until the episode ends; the other envs never render."""

    def __init__(self, env: Any, count: int):
        self.env, self.count = env, count
        self.frames: list[list[np.ndarray]] = [[] for _ in range(count)]
        self.success = np.zeros(count, bool)
        self.recording = np.zeros(count, bool)

    def __getattr__(self, name: str) -> Any:  # everything else is the env's
        return getattr(self.env, name)

    def reset(self, seed: int | None = None) -> tuple[Obs, dict]:
        out = self.env.reset(seed=seed)
        self.frames = [[] for _ in range(self.count)]
        self.success[:], self.recording[:] = False, True
        self._draw(np.arange(self.count))
        return out

    def step(self, actions: np.ndarray, active: np.ndarray | None = None) -> tuple:
        obs, reward, term, trunc, info = self.env.step(actions, active=active)
        n = self.count
        stepped = self.recording & (True if active is None else np.asarray(active, bool)[:n])
        self._draw(np.flatnonzero(stepped))
        self.success |= stepped & np.asarray(info["success"], bool)[:n]
        self.recording &= ~(stepped & (np.asarray(term, bool)[:n] | np.asarray(trunc, bool)[:n]))
        return obs, reward, term, trunc, info

    def _draw(self, idx: np.ndarray) -> None:
        if len(idx):
            for e, frame in zip(idx, self.env.render_frames(idx), strict=True):
                self.frames[e].append(frame)

    def videos(self) -> list[tuple[np.ndarray, bool, int]]:
        """(frames [L+1,h,w,3], success, L) of each recorded episode (an unfinished one: its frames so far, failed)."""
        done = ~self.recording
        return [(np.stack(f), bool(s & d), len(f) - 1) for f, s, d in zip(self.frames, self.success, done, strict=True)]
