"""Run folders: the shared run block of Args, choice checking, progress lines, and loading the starting π₀ from a
run folder of the scripts or an openpi checkpoint."""

import dataclasses
import json
import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import pi0, runlog

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures")


@dataclasses.dataclass
class Args(runlog.RunArgs):
    exp_name: str = "test"
    """the script's own default"""
    mode: Literal["a", "b-c"] = "a"
    """a choice"""


def stats(state_dim: int, action_dim: int) -> dict:
    one = lambda d, v: {s: np.full(d, v + i, np.float32) for i, s in enumerate(("mean", "std", "q01", "q99"))}
    return {"state": one(state_dim, 0.5), "actions": one(action_dim, -1.0)}


def test_run_block_and_choices(tmp_path, capsys) -> None:
    args = Args(run_dir=str(tmp_path / "run"), seed=3)
    assert [f.name for f in dataclasses.fields(args)][:3] == ["exp_name", "seed", "env"] and args.exp_name == "test"
    assert runlog.crossed(9, 11, 5) and runlog.crossed(4, 5, 5) and not runlog.crossed(5, 9, 5)
    assert not runlog.crossed(0, 100, 0)  # 0: never
    runlog.check_choices(Args(mode="b-c"))
    with pytest.raises(ValueError, match="--mode 'd': choose one of"):
        runlog.check_choices(Args(mode="d"))
    run = runlog.Run.from_args(args, "script")
    run.progress(5, 10, "phase", 0, 0.0, loss=jnp.float32(0.25), q=1)  # device scalars are fine
    assert "loss=0.25  q=1" in capsys.readouterr().out
    run.close()
    assert run.dir == str(tmp_path / "run") and json.load(open(tmp_path / "run" / "args.json"))["seed"] == 3


@pytest.mark.parametrize("key", ["params", "pi"])
def test_load_pi0_from_a_run_folder(tmp_path, key) -> None:
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=5)
    params = pi0.Pi0(cfg).init(jax.random.key(0))
    run = runlog.Run(Args(), "script", env="push", seed=1, run_dir=str(tmp_path / "run"))
    run.save(7, {key: params, "other": jnp.zeros(3)}, {"norm_stats": stats(10, 2), "step": 7})
    run.close()
    got, got_cfg, got_stats = runlog.load_pi0(
        str(tmp_path / "run"), action_horizon=5, run_config={"max_token_len": cfg.max_token_len, "cameras": ()}
    )
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)
    jax.tree.map(np.testing.assert_array_equal, got_stats, stats(10, 2))
    assert got_stats["state"]["mean"].dtype == np.float32
    assert runlog.load_pi0(str(tmp_path / "run"), action_horizon=3)[1].max_token_len == 48  # the default
    bad = runlog.Run(Args(), "script", env="push", seed=1, run_dir=str(tmp_path / "bad"))
    bad.save(1, {"weights": jnp.zeros(2)}, {"norm_stats": stats(10, 2)})
    bad.close()
    with pytest.raises(ValueError, match="expected the π₀ params"):
        runlog.load_pi0(str(tmp_path / "bad"), action_horizon=5)
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="empty"):
        runlog.load_pi0(str(tmp_path / "empty"), action_horizon=5)


def test_load_pi0_from_an_openpi_checkpoint(tmp_path) -> None:
    params_dir = os.path.join(FIXTURES, "openpi_pi0_tiny", "params")
    if not os.path.isdir(params_dir):
        pytest.skip(f"openpi fixtures not found at {os.path.abspath(FIXTURES)}")
    ckpt = tmp_path / "ckpt"
    (ckpt / "assets" / "org" / "robot").mkdir(parents=True)
    os.symlink(params_dir, ckpt / "params")
    raw = {k: {s: v.tolist() for s, v in d.items()} for k, d in stats(8, 7).items()}
    (ckpt / "assets" / "org" / "robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": raw}))
    params, cfg, got_stats = runlog.load_pi0(str(ckpt), action_horizon=10, asset_id="org/robot")
    want, want_cfg = pi0.load_openpi_params(params_dir, action_horizon=10, max_token_len=48)
    assert cfg == want_cfg and cfg.max_token_len == 48
    jax.tree.map(np.testing.assert_array_equal, params, want)
    jax.tree.map(np.testing.assert_array_equal, got_stats, stats(8, 7))
