"""Run folders: the shared run block of Args, choice checking, progress lines, resuming with the run's own flags,
checkpoints with host arrays, metrics truncated at a resume, stopping on SIGTERM, and loading the starting π₀ from a
run folder of the scripts or an openpi checkpoint."""

import dataclasses
import json
import os
import shutil
import signal
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import RunError, openpi, pi0, runlog

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
    run = runlog.Run(args, "script")
    run.report(5, {"losses/loss": jnp.float32(0.25), "q": 1}, "phase", 10, (0, 0.0), ("losses/loss", "q"))  # on device
    assert "loss=0.25  q=1" in capsys.readouterr().out
    run.close()
    assert run.dir == str(tmp_path / "run") and json.load(open(tmp_path / "run" / "args.json"))["seed"] == 3


def test_load_pi0_from_a_run_folder(tmp_path) -> None:
    cfg = pi0.make_config("cpu", action_dim=2, state_dim=10, action_horizon=5)
    params = pi0.Pi0(cfg).init(jax.random.key(0))
    run = runlog.Run(Args(run_dir=str(tmp_path / "run")), "script")
    run.save(7, {"params": params, "other": jnp.zeros(3)}, {"norm_stats": stats(10, 2), "step": 7})
    run.close()
    got, got_cfg, got_stats = openpi.load_pi0(
        str(tmp_path / "run"), action_horizon=5, run_config={"max_token_len": cfg.max_token_len, "cameras": ()}
    )
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)
    jax.tree.map(np.testing.assert_array_equal, got_stats, stats(10, 2))
    assert got_stats["state"]["mean"].dtype == np.float32
    assert openpi.load_pi0(str(tmp_path / "run"), action_horizon=3)[1].max_token_len == 48  # the default
    # π₀'s state input is what its shapes say (10 here), whatever the next run's env has (an openpi π₀ takes 32)
    assert openpi.load_pi0(str(tmp_path / "run"), action_horizon=5, run_config={"state_dim": 7})[1].state_dim == 10
    # a run that kept an average θ̄ of part of π₀ (--ema-decay): θ̄ is its π₀, the other leaves θ's
    model = pi0.Pi0(cfg)
    ema = jax.tree.map(lambda x: x + 1.0, pi0.trained_part(params, model.optimizer_labels(params, "train", True)))
    assert "embedder" not in ema["PaliGemma"]["llm"] and "final_norm_1" in ema["PaliGemma"]["llm"]
    avg = runlog.Run(Args(run_dir=str(tmp_path / "avg")), "script")
    avg.save(3, {"params": params, "ema": ema}, {"norm_stats": stats(10, 2), "step": 3})
    avg.close()
    got = openpi.load_pi0(str(tmp_path / "avg"), action_horizon=5, run_config={"cameras": ()})[0]
    jax.tree.map(np.testing.assert_array_equal, got, pi0.overlaid(params, ema))
    np.testing.assert_array_equal(got["state_proj"]["kernel"], params["state_proj"]["kernel"] + 1.0)
    embedder = got["PaliGemma"]["llm"]["embedder"]  # the VLM's leaves, not averaged: θ's
    jax.tree.map(np.testing.assert_array_equal, embedder, params["PaliGemma"]["llm"]["embedder"])
    bad = runlog.Run(Args(run_dir=str(tmp_path / "bad")), "script")
    bad.save(1, {"pi": params}, {"norm_stats": stats(10, 2)})  # π₀ under another key
    bad.close()
    with pytest.raises(ValueError, match="expected the π₀ params"):
        openpi.load_pi0(str(tmp_path / "bad"), action_horizon=5)
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(RunError, match="empty"):
        openpi.load_pi0(str(tmp_path / "empty"), action_horizon=5)


def test_load_pi0_from_an_openpi_checkpoint(tmp_path) -> None:
    params_dir = os.path.join(FIXTURES, "openpi_pi0_tiny", "params")
    if not os.path.isdir(params_dir):
        pytest.skip(f"openpi fixtures not found at {os.path.abspath(FIXTURES)}")
    ckpt = tmp_path / "ckpt"
    (ckpt / "assets" / "org" / "robot").mkdir(parents=True)
    os.symlink(params_dir, ckpt / "params")
    raw = {k: {s: v.tolist() for s, v in d.items()} for k, d in stats(8, 7).items()}
    (ckpt / "assets" / "org" / "robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": raw}))
    params, cfg, got_stats = openpi.load_pi0(str(ckpt), action_horizon=10, asset_id="org/robot")
    want, want_cfg = openpi.load_openpi_params(params_dir, action_horizon=10, max_token_len=48)
    assert cfg == dataclasses.replace(want_cfg, discrete_state=False) and cfg.max_token_len == 48
    jax.tree.map(np.testing.assert_array_equal, params, want)
    jax.tree.map(np.testing.assert_array_equal, got_stats, stats(8, 7))
    # π₀.₅ as openpi configures it: 200 prompt tokens, the state in the prompt, except in openpi's pi05_libero
    for name, state_in_prompt in (("pi05_base", True), ("pi05_libero", False)):
        (tmp_path / name / "assets" / "x").mkdir(parents=True)
        os.symlink(os.path.join(FIXTURES, "openpi_pi05_tiny", "params"), tmp_path / name / "params")
        (tmp_path / name / "assets" / "x" / "norm_stats.json").write_text(json.dumps({"norm_stats": raw}))
        cfg = openpi.load_pi0(str(tmp_path / name), action_horizon=10)[1]
        assert cfg.pi05 and cfg.max_token_len == 200 and cfg.state_in_prompt == state_in_prompt, name


def test_resume_takes_the_runs_own_flags(tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    runlog.Run(Args(run_dir=run_dir, seed=3, mode="b-c"), "script").close()
    back = runlog.resumed(Args(run_dir=run_dir, resume=True, track=True), "script")  # run flags may change
    assert (back.seed, back.mode, back.track, back.resume) == (3, "b-c", True, True)
    assert runlog.resumed(Args(run_dir=run_dir, resume=True, seed=3), "script").seed == 3  # given again: agrees
    with pytest.raises(RunError, match=r"--seed 4 \(the run has 3\), --mode 'a'|--seed 4 \(the run has 3\)"):
        runlog.resumed(Args(run_dir=run_dir, resume=True, seed=4), "script")
    with pytest.raises(RunError, match="is a run of script.py, not other.py"):
        runlog.resumed(Args(run_dir=run_dir, resume=True), "other")
    saved = json.load(open(os.path.join(run_dir, "args.json")))
    json.dump({**saved, "retired_flag": 1}, open(os.path.join(run_dir, "args.json"), "w"))
    with pytest.raises(RunError, match="another version of script.py .flags this one does not have: --retired-flag"):
        runlog.resumed(Args(run_dir=run_dir, resume=True), "script")
    json.dump(saved, open(os.path.join(run_dir, "args.json"), "w"))
    # a flag added since the run was saved (runlog.ADDED_FLAGS) takes the value of the run's old behaviour
    with_ema = dataclasses.make_dataclass("WithEma", [("ema_decay", float, 0.999)], bases=(Args,))
    assert runlog.resumed(with_ema(run_dir=run_dir, resume=True), "script").ema_decay == 0.0
    assert with_ema(run_dir=run_dir).ema_decay == 0.999  # a new run: the default
    with pytest.raises(RunError, match="is not empty"):
        Args(run_dir=run_dir).check_run()


def test_save_restore_truncate_and_stop(tmp_path) -> None:
    """A checkpoint with host arrays comes back whole; metrics logged after it are dropped at the resume; a host-only
    save at the same step; SIGTERM: the next save exits with status 0."""
    run_dir, state = str(tmp_path / "run"), {"w": jnp.arange(3.0)}
    run = runlog.Run(Args(run_dir=run_dir), "script")
    host = {"buffer": {"x": np.ones((2, 2))}, "loop": {"obs": {"state": np.zeros(2), "images": {}}}, "flags": [True]}
    for step in (1, 2):
        run.log(step, {"losses/a": step})
        run.save(step, {"w": state["w"] * step}, {"norm_stats": {}, "n": step}, host)
    run.save(2, state, {}, {**host, "flags": [False]})  # the same step again: the host file only
    run.log(3, {"losses/a": 3.0})  # after the last checkpoint: gone at the resume
    run.close()
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 2, "losses/a"')  # a row cut by a kill
    ckpt = os.path.join(run_dir, "checkpoints")  # killed after saving step 2, before orbax dropped step 0
    shutil.copytree(os.path.join(ckpt, "1"), os.path.join(ckpt, "0"))
    shutil.copy(os.path.join(run_dir, "host", "1.p0.npz"), os.path.join(run_dir, "host", "0.p0.npz"))
    back = runlog.Run(Args(run_dir=run_dir, resume=True), "script")
    assert sorted(os.listdir(ckpt)) == ["1", "2"]  # pruned at the resume (keep=2), as an unkilled run would have
    step, got, extra, saved = back.restore(state)
    assert step == 2 and extra["n"] == 2 and saved["loop"]["obs"]["images"] == {} and not saved["flags"][0]
    np.testing.assert_array_equal(got["w"], state["w"] * 2)  # the orbax state of the first save at step 2
    assert [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))] == [1, 2]
    assert sorted(os.listdir(os.path.join(run_dir, "host"))) == ["1.p0.npz", "2.p0.npz"]
    before = back._handlers[signal.SIGTERM]
    signal.raise_signal(signal.SIGTERM)  # handled: the run stops at its next save
    assert back.stopping == "SIGTERM"
    with pytest.raises(SystemExit) as stop:
        back.save(3, state, {}, host)
    assert stop.value.code == 0 and signal.getsignal(signal.SIGTERM) is before  # handlers given back
    with pytest.raises(RunError, match="holds NaN or inf and was not saved"):
        runlog.Run(Args(run_dir=str(tmp_path / "nan")), "script").save(1, {"w": jnp.full(2, jnp.nan)}, {})


def test_checkpoint_record_of_an_openpi_checkpoint(tmp_path) -> None:
    """openpi stores no config with a checkpoint: its pi0_libero / pi05_libero are known by name, our exports by
    their pi0rl.json; anything else is left to --model-horizon."""
    for name in ("pi0_libero", "pi05_libero", "pi05_droid", "export"):
        (tmp_path / name).mkdir()
    (tmp_path / "export" / openpi.EXPORT_RECORD).write_text(json.dumps({"action_horizon": 7}))
    for name, want in (("pi0_libero", 50), ("pi05_libero", 10), ("pi05_droid", None), ("export", 7)):
        assert openpi.checkpoint_record(str(tmp_path / name)).get("action_horizon") == want, name
    assert openpi.checkpoint_record(str(tmp_path / "pi05_libero"))["discrete_state"] is False
    args = openpi.located(runlog.RunArgs(pi0_checkpoint=str(tmp_path / "pi0_libero")))
    assert args.model_horizon == 50 and args.pi0_preset == "cpu"
    given = runlog.RunArgs(pi0_checkpoint=str(tmp_path / "pi0_libero"), model_horizon=5)
    assert openpi.located(given).model_horizon == 5


def test_check_ema(capsys):
    """--ema-decay outside [0, 1) is refused; a run too short for its average (d^updates > 5%: the average still holds
    that much of the starting weights) is warned about, with a decay that fits; the defaults and no average are not."""
    with pytest.raises(RunError, match=r"--ema-decay must be in \[0, 1\)"):
        runlog.check_ema(1.0, 14_000, "policy updates")
    runlog.check_ema(0.999, 14_000, "policy updates")  # chunk_awr's default: 0.999^14000 < 1e-6
    runlog.check_ema(0.999, 0, "BC updates")  # flow_ppo from a checkpoint: no BC, no average
    runlog.check_ema(0.0, 10, "policy updates")
    assert capsys.readouterr().out == ""
    runlog.check_ema(0.999, 2000, "policy updates")
    out = capsys.readouterr().out
    assert "still holds 14% of the starting weights" in out and "--ema-decay 0.9985" in out
    assert 0.9985**2000 < 0.05  # the decay it suggests leaves 5% of them
    runlog.check_ema(0.5, 2, "BC updates")  # too few updates for any average: it suggests none
    assert "--ema-decay 0)" in capsys.readouterr().out
