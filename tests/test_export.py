"""openpi.export: a trained run and an openpi checkpoint exported and read back unchanged; bad input refused."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from common import RunError, envs, openpi, pi0, runlog
from common.openpi import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
sys.path.insert(0, os.path.join(ROOT, "tests"))


def flat(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_same_stats(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys(), k
        for s in a[k]:
            np.testing.assert_array_equal(a[k][s], b[k][s])


def openpi_restore(params_dir: str) -> dict:
    """The parameters as openpi's `model.restore_params` reads them for fine-tuning (`CheckpointWeightLoader`): the
    item {"params": ...} from the checkpoint's metadata, every leaf restored as a numpy array."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckpt:
        meta = ckpt.metadata(params_dir)
        item = {"params": getattr(meta, "item_metadata", meta)["params"]}  # orbax ≥ 0.12 wraps it
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
        return ckpt.restore(params_dir, ocp.args.PyTreeRestore(item=item, restore_args=args))["params"]


def test_run_round_trip(tmp_path, tiny_runs):
    """A tiny acrlpd run exported: the same parameters, norm stats and sampled chunks as the run folder itself."""
    run = tiny_runs("acrlpd_pi0")[0]
    out = str(tmp_path / "export")
    line = export(run, out)
    assert "(π₀: " in line and "'push'" in line and out in line and "openpi needs a model config" in line
    assert sorted(os.listdir(out)) == ["assets", "params", "pi0rl.json"]
    assert not os.path.exists(f"{out}.partial-{os.getpid()}")
    with open(os.path.join(out, "pi0rl.json")) as f:  # the run's prompt form, read back by --pi0-checkpoint
        assert json.load(f) == {"max_token_len": 12, "discrete_state": False, "action_horizon": 5}
    with open(os.path.join(out, "assets", "push", "norm_stats.json")) as f:
        assert set(json.load(f)) == {"norm_stats"}

    p_run, _, s_run = openpi.load_pi0(run, 5)
    a, b = flat(p_run), flat(openpi_restore(os.path.join(out, "params")))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == np.float32 and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert_same_stats(s_run, openpi.load_pi0(out, 5, asset_id="push")[2])

    env = envs.make_env("push", 4)
    obs = env.reset(seed=0)[0]
    chunks = []
    for src, asset in ((run, None), (out, "push")):  # both pad prompts to the run's 12 tokens (pi0rl.json)
        policy = runlog.make_policy(
            env,
            env.prompts,
            None,
            jax.random.key(0),
            env_name="push",
            checkpoint=src,
            preset="cpu",
            tokenizer=None,
            asset_id=asset,
            action_horizon=5,
            model_horizon=0,
        )
        chunks.append(pi0.sample_env_actions(policy.model, policy.io, policy.params, obs, jax.random.key(7), 4))
    assert chunks[0].shape == (4, 5, 2)
    np.testing.assert_array_equal(np.asarray(chunks[0]), np.asarray(chunks[1]))


def test_openpi_fixture_round_trip(tmp_path):
    """openpi's own tiny π₀ re-exported: its _METADATA tree unchanged, openpi's outputs reproduced, stats kept."""
    fixture = os.path.join(FIXTURES, "openpi_pi0_tiny")
    if not os.path.isdir(fixture):
        pytest.skip(
            f"openpi fixtures not found at {os.path.abspath(FIXTURES)} (they live in the team's shared/ "
            "folder beside the checkout; a fresh clone has none)"
        )
    import openpi_parity

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(os.path.join(fixture, "params"), os.path.join(src, "params"))  # src/ itself writable
    rng = np.random.default_rng(0)
    stats = {
        "state": {"mean": rng.normal(size=32), "std": rng.uniform(0.1, 2, 32)},  # openpi writes q01 = null
        "actions": {s: rng.normal(size=32) for s in ("mean", "std", "q01", "q99")},
    }
    os.makedirs(os.path.join(src, "assets", "test"))
    with open(os.path.join(src, "assets", "test", "norm_stats.json"), "w") as f:
        json.dump({"norm_stats": {k: {s: x.tolist() for s, x in v.items()} for k, v in stats.items()}}, f)

    line = export(src, out)  # the source's only asset
    assert "(π₀: " in line and "'test'" in line and "vocab 1024" in line and "horizon not stored" in line
    for name in ("reference.npz", "config.json"):
        shutil.copy(os.path.join(fixture, name), out)
    errors = openpi_parity.parity(out)
    assert all(errors[k] <= openpi_parity.TOLERANCES[k] for k in errors), errors

    meta = lambda d: json.load(open(os.path.join(d, "params", "_METADATA")))["tree_metadata"]
    assert meta(out) == meta(fixture)  # the same tree, leaf types (jax.Array) and shapes as openpi's own checkpoint
    with open(os.path.join(out, "assets", "test", "norm_stats.json")) as f:
        text = f.read()
    assert text.startswith('{\n  "norm_stats": {\n    "state": {\n      "mean": [')  # indent 2, as openpi's dump
    assert json.loads(text)["norm_stats"]["state"]["q01"] is None
    want = {k: {s: np.float32(x) for s, x in v.items()} for k, v in stats.items()}
    assert_same_stats(openpi.load_norm_stats(out, "test"), want)


def tiny_openpi(folder: str, nan: bool = False) -> str:
    """A CPU-preset π₀ written as an openpi checkpoint (params + one asset); `nan`: one parameter NaN."""
    import orbax.checkpoint as ocp

    params = pi0.Pi0(pi0.PRESETS["cpu"]).init(jax.random.key(0))
    if nan:
        params["action_in_proj"]["kernel"] = params["action_in_proj"]["kernel"].at[0, 0].set(np.nan)
    ocp.PyTreeCheckpointer().save(os.path.join(folder, "params"), {"params": params})
    unit = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    runlog.atomic_write(
        os.path.join(folder, "assets", "push", "norm_stats.json"),
        json.dumps({"norm_stats": {"state": unit, "actions": unit}}).encode(),
    )
    return folder


def test_bad_input_is_refused(tmp_path, monkeypatch):
    src = tiny_openpi(str(tmp_path / "src"))
    with pytest.raises(RunError, match=f"{tmp_path}/nowhere: no such folder"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="empty is neither a run folder"):
        export(str(tmp_path / "empty"), str(tmp_path / "a"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(RunError, match=f"{tmp_path}/mine already exists and is not empty"):
        export(src, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["keep.txt"] and (tmp_path / "mine" / "keep.txt").read_text() == "user data"
    with pytest.raises(RunError, match="--asset-id '../x': a relative path"):
        export(src, str(tmp_path / "a"), asset_id="../x")
    with pytest.raises(RunError, match="NaN or inf in action_in_proj/kernel"):
        export(tiny_openpi(str(tmp_path / "nan"), nan=True), str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a")

    def fail(*a, **k):  # a write that fails half way (a full disk): nothing at OUT_DIR, no partial folder left
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog, "atomic_write", fail)
    with pytest.raises(RunError, match="No space left on device"):
        export(src, str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path)) == ["empty", "mine", "nan", "src"]
    monkeypatch.undo()
    (tmp_path / "b").mkdir()  # an empty OUT_DIR is fine
    assert "'push'" in export(src, str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b")) == ["assets", "params", "pi0rl.json"]

    cli = [sys.executable, "-m", "common.openpi", str(tmp_path / "nowhere"), str(tmp_path / "c")]
    proc = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path}/nowhere: no such folder; pass a run folder "
        "(args.json, checkpoints/) or an openpi checkpoint"
    ]
