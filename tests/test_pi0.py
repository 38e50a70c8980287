"""The π₀ backbone: openpi parity on the shared fixtures, the cached/broadcast paths, loading errors, tokenizers."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import RunError, openpi, pi0

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "..", "shared", "fixtures")
NAMES = ["openpi_pi0_tiny", "openpi_pi05_tiny", "openpi_pi0_wide", "openpi_pi05_wide"]
sys.path.insert(0, os.path.join(ROOT, "tests"))


def fixture(name: str) -> str:
    path = os.path.join(FIXTURES, name)
    if not os.path.isdir(path):
        pytest.skip(
            f"openpi fixtures not found at {os.path.abspath(FIXTURES)} (they live in the team's shared/ "
            "folder beside the checkout; a fresh clone has none)"
        )
    return path


@pytest.mark.parametrize("name", NAMES)
def test_openpi_parity(name):
    import openpi_parity

    errors = openpi_parity.parity(fixture(name))
    for key, err in errors.items():
        assert err <= openpi_parity.TOLERANCES[key], (name, key, err)


@pytest.mark.slow  # ~11 s: tests/openpi_parity.py from the shell, over every fixture
def test_parity_script_cli():
    path = fixture("openpi_pi0_tiny")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "openpi_parity.py"), path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sampled_actions" in out.stdout


def small(pi05=False, **kw):
    return pi0.make_config(
        "cpu", pi05=pi05, cameras=("base_0_rgb", "left_wrist_0_rgb"), action_dim=3, state_dim=4, action_horizon=4, **kw
    )


def batch_obs(config, B, rng):
    k1, k2 = jax.random.split(rng)
    table = pi0.make_prompt_table(
        ["push the block to the red target", "open the drawer"],
        pi0.BuiltinTokenizer(config.max_token_len, config.vocab_size),
    )
    obs = {
        "state": jax.random.normal(k1, (B, 4)),
        "prompt_id": jnp.arange(B) % 2,
        "images": {"base_0_rgb": jax.random.randint(k2, (B, 48, 40, 3), 0, 255).astype(jnp.uint8)},
    }
    return pi0.make_observation(config, obs, table)  # the wrist camera is missing: black and masked


@pytest.mark.parametrize("pi05", [False, True])
def test_cached_candidates_match_joint_pass(pi05):
    """N candidates over one broadcast prefix cache give what the joint pass gives each candidate separately."""
    config = small(pi05)
    model = pi0.Pi0(config)
    params = model.init(jax.random.key(0))
    B, N, H, A = 2, 3, config.action_horizon, config.action_dim
    obs = batch_obs(config, B, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (B, N, H, A))
    t = jax.random.uniform(jax.random.key(3), (B, N))
    v_cached, _ = jax.jit(lambda p, o, x, t: model.velocity(p, model.prefix(p, o), x, t))(params, obs, x, t)
    tiled = jax.tree.map(lambda a: jnp.repeat(a, N, axis=0), obs)
    joint = jax.jit(lambda p, *a: model.module.apply({"params": p}, *a))  # openpi's pass: prefix + suffix at once
    v_joint, _ = joint(params, tiled, x.reshape(B * N, H, A), t.reshape(B * N))
    np.testing.assert_allclose(v_cached.reshape(B * N, H, A), v_joint, rtol=1e-4, atol=1e-5)
    assert obs.image_masks["left_wrist_0_rgb"].sum() == 0 and obs.images["base_0_rgb"].shape == (B, 32, 32, 3)


def test_frozen_backbone_skips_vlm_gradients():
    config = small()
    model = pi0.Pi0(config)
    params = model.init(jax.random.key(0))
    obs = batch_obs(config, 2, jax.random.key(1))
    actions = jnp.ones((2, config.action_horizon, config.action_dim))

    def loss(p, frozen):  # a frozen backbone: the scripts stop the gradient at the prefix
        prefix = model.prefix(p, obs)
        prefix = jax.lax.stop_gradient(prefix) if frozen else prefix
        return model.flow_loss(p, prefix, actions, jax.random.key(2)).mean()

    mask = jax.tree.map(lambda label: label == "frozen", model.optimizer_labels(params, "train", True))
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_frozen, g_full = grad(params, True), grad(params, False)
    flat = lambda t: jax.tree.leaves(t)
    for m, gf in zip(flat(mask), flat(g_frozen), strict=True):
        if m:
            assert not np.any(gf), "a frozen backbone must not receive gradient"
    assert any(np.any(g) for m, g in zip(flat(mask), flat(g_full), strict=True) if m)
    assert any(np.any(g) for m, g in zip(flat(mask), flat(g_frozen), strict=True) if not m)


def test_bfloat16_end_to_end():
    config = small(dtype="bfloat16", param_dtype="bfloat16")
    model = pi0.Pi0(config)
    params = model.init(jax.random.key(0))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    obs = batch_obs(config, 2, jax.random.key(1))
    prefix = jax.jit(model.prefix)(params, obs)
    assert prefix.k.dtype == jnp.bfloat16
    acts = jax.jit(model.sample, static_argnums=3)(params, prefix, jnp.ones((2, 5, 4, 3)), 3)
    assert acts.shape == (2, 5, 4, 3) and bool(jnp.isfinite(acts).all())


@pytest.mark.slow  # ~75 s under the suite's load: π₀.₅'s loss and gradients compiled 3 times (float32, remat, bf16)
def test_remat_and_mixed_precision():
    """--remat recomputes each layer in the backward pass: the same loss and gradients; --precision bfloat16 computes
    in bfloat16 from float32 parameters (openpi's training): close, and the gradients stay float32."""
    base = small(pi05=True)  # π₀.₅: its adaRMS layers too
    params = pi0.Pi0(base).init(jax.random.key(0))
    obs = batch_obs(base, 4, jax.random.key(1))
    actions = jax.random.normal(jax.random.key(2), (4, 4, 3))

    def loss_and_grad(**kw):
        model = pi0.Pi0(dataclasses.replace(base, **kw))
        prefix_then_flow = lambda p: model.flow_loss(p, model.prefix(p, obs), actions, jax.random.key(3)).mean()
        traced = jax.jit(jax.value_and_grad(prefix_then_flow)).trace(params)  # traced once: counted, then compiled
        remats = len(re.findall(r"\b(?:checkpoint|remat2?)\[", str(traced.jaxpr)))  # Gemma: prefix, suffix; SigLIP: 2
        assert remats == (0 if kw.get("remat", "none") == "none" else 4), remats  # cameras
        return traced.lower().compile()(params)

    ref_loss, ref_grad = loss_and_grad()
    loss, grad = loss_and_grad(remat="nothing_saveable")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
    loss, grad = loss_and_grad(dtype="bfloat16", remat="nothing_saveable")
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad))
    np.testing.assert_allclose(loss, ref_loss, rtol=0.03)  # bfloat16 keeps 8 bits of mantissa
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    cos = flat(grad) @ flat(ref_grad) / np.linalg.norm(flat(grad)) / np.linalg.norm(flat(ref_grad))
    assert cos > 0.99, cos
    with pytest.raises(ValueError, match="remat 'everything'"):
        small(remat="everything")


def test_sample_with_zero_steps_velocity_is_euler():
    """sample() with one step is x − v(x, 1)."""
    config = small()
    model = pi0.Pi0(config)
    params = model.init(jax.random.key(0))
    prefix = model.prefix(params, batch_obs(config, 2, jax.random.key(1)))
    noise = jax.random.normal(jax.random.key(2), (2, 2, 4, 3))
    v, _ = model.velocity(params, prefix, noise, jnp.ones((2, 2)))
    np.testing.assert_allclose(model.sample(params, prefix, noise, 1), noise - v, rtol=1e-5, atol=1e-6)


def test_loader_errors(tmp_path):
    with pytest.raises(openpi.CheckpointError, match="does not exist"):
        openpi.load_openpi_params(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(openpi.CheckpointError, match="not an openpi checkpoint"):
        openpi.load_openpi_params(str(tmp_path / "empty"))
    path = fixture("openpi_pi0_tiny")
    wrong = pi0.make_config("pi0", action_horizon=10)  # the full-size π₀ preset cannot hold the tiny weights
    with pytest.raises(openpi.CheckpointError, match=r"checkpoint has shape .* the requested model needs"):
        openpi.load_openpi_params(path, action_horizon=10, expect=wrong)
    params, config = openpi.load_openpi_params(path, action_horizon=10, max_token_len=48)
    del params["action_out_proj"]
    with pytest.raises(openpi.CheckpointError, match="missing action_out_proj/kernel"):
        openpi.check_params(params, config)
    with pytest.raises(openpi.CheckpointError, match="norm stats"):
        openpi.load_norm_stats(path)


def test_loader_infers_sizes_and_casts():
    params, config = openpi.load_openpi_params(
        fixture("openpi_pi0_wide"), action_horizon=7, max_token_len=20, dtype="bfloat16"
    )
    assert (config.vlm.width, config.expert.width, config.vlm.num_heads, config.vit.num_heads) == (80, 40, 4, 3)
    assert config.vocab_size == 777 and config.action_dim == 16 and not config.pi05
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16


def test_norm_stats(tmp_path):
    d = tmp_path / "ckpt" / "assets" / "physical-intelligence" / "libero"
    d.mkdir(parents=True)
    (d / "norm_stats.json").write_text(
        '{"norm_stats": {"state": {"mean": [1, 2], "std": [2, 2], "q01": [0, 0], '
        '"q99": [4, 4]}, "actions": {"mean": [0], "std": [1]}}}'
    )
    stats = openpi.load_norm_stats(str(tmp_path / "ckpt"), "physical-intelligence/libero")
    x = jnp.array([[3.0, 4.0, 9.0]])  # the extra (padded) dim passes through
    np.testing.assert_allclose(pi0.normalize(x, stats["state"]), [[1.0, 1.0, 9.0]], rtol=1e-5)
    np.testing.assert_allclose(
        pi0.unnormalize(pi0.normalize(x, stats["state"], True), stats["state"], True), x, rtol=1e-5
    )


def test_tokenizers(tmp_path):
    tok = pi0.BuiltinTokenizer(12, 128)
    red, _ = tok.tokenize("push the block to the red target")
    blue, mask = tok.tokenize("push the block to the blue target")
    assert red[0] == 1 and (red != blue).sum() == 1 and mask.sum() == 9 and red.max() < 128
    long, mask = tok.tokenize(" ".join(["word"] * 40))
    assert mask.all() and long.shape == (12,)
    with pytest.raises(RunError, match="--tokenizer"):
        openpi.PaligemmaTokenizer(str(tmp_path / "missing.model"), 48)
    config = pi0.make_config("cpu", max_token_len=7, vocab_size=100)
    tok = pi0.make_tokenizer(None, config)  # no --tokenizer: the built-in one, at the config's sizes
    assert isinstance(tok, pi0.BuiltinTokenizer) and (tok.max_len, tok.vocab_size) == (7, 100)
    with pytest.raises(RunError, match="--tokenizer"):  # a path: PaliGemma's SentencePiece model
        pi0.make_tokenizer(str(tmp_path / "missing.model"), config)


@pytest.mark.parametrize("quantile", [False, True])
def test_env_io(quantile):
    """A LIBERO-like env (state 8, actions 7) on a model with 10 action dims; with delta the first 6 action dims are
    relative to the state (openpi's pi0_libero)."""
    config = pi0.make_config("cpu", action_dim=10, state_dim=8, action_horizon=4)
    rng = np.random.default_rng(0)
    stats = {
        k: {
            "mean": rng.normal(size=d),
            "std": rng.uniform(0.5, 2, d),
            "q01": -rng.uniform(1, 2, d),
            "q99": rng.uniform(1, 2, d),
        }
        for k, d in (("state", 8), ("actions", 7))
    }
    stats = jax.tree.map(lambda x: np.asarray(x, np.float32), stats)
    table = pi0.make_prompt_table(["do it"], pi0.BuiltinTokenizer(config.max_token_len, config.vocab_size))
    obs = {"state": rng.normal(size=(3, 8)).astype(np.float32), "prompt_id": np.zeros(3, np.int32), "images": {}}
    actions = rng.normal(size=(3, 4, 7)).astype(np.float32)  # [B,H,A]
    for delta in (0, 6):
        io = pi0.EnvIO(config, table, stats, 7, delta, quantile)
        want = pi0.make_observation(config, obs, table, stats["state"], quantile)
        jax.tree.map(np.testing.assert_array_equal, io.observe(obs), want)
        model_actions = io.to_model(actions, obs["state"])
        assert model_actions.shape == (3, 4, 10) and not np.asarray(model_actions[..., 7:]).any()  # zero-padded
        offset = np.concatenate([obs["state"][:, None, :delta], np.zeros((3, 1, 7 - delta))], -1)
        np.testing.assert_allclose(
            model_actions[..., :7], pi0.normalize(actions - offset, stats["actions"], quantile), atol=1e-5
        )
        absolute = pi0.normalize(actions, stats["actions"], quantile)  # without a state
        np.testing.assert_allclose(io.to_model(actions)[..., :7], absolute, atol=1e-5)
        np.testing.assert_allclose(io.to_env(model_actions, obs["state"]), actions, atol=1e-5)  # and back


def test_resize_with_pad():
    img = jnp.full((1, 20, 40, 3), 255, jnp.uint8)
    out = pi0.resize_with_pad(img, 32, 32)
    assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.uint8
    assert int(out[0, 0, 0, 0]) == 0 and int(out[0, 16, 16, 0]) == 255  # black bars above and below


def test_config_validation():
    with pytest.raises(ValueError, match="share attention"):
        dataclasses.replace(pi0.PRESETS["cpu"], expert=pi0.GemmaConfig(32, 3, 64, 2, 1, 32))
    with pytest.raises(ValueError, match="unknown π₀ preset"):
        pi0.make_config("pi1")


def test_env_io_executes_the_first_actions_of_a_longer_chunk():
    """openpi's pi0_libero predicts 50 actions and executes 5: a model chunk H_m longer than the executed H."""
    config = pi0.make_config("cpu", action_dim=4, state_dim=3, action_horizon=6)  # H_m = 6, A_m = 4
    stats = {k: {"mean": np.zeros(2, np.float32), "std": np.full(2, 2.0, np.float32)} for k in ("state", "actions")}
    table = pi0.make_prompt_table(["do it"], pi0.BuiltinTokenizer(config.max_token_len, config.vocab_size))
    io = pi0.EnvIO(config, table, stats, action_dim=2, horizon=2)
    actions = np.arange(2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2)  # [B,H,A] executed chunks from data
    model = io.to_model(actions)
    assert model.shape == (2, 6, 4)  # [B,H_m,A_m]: steps and dims padded with zeros
    np.testing.assert_allclose(model[:, :2, :2], actions / 2.0, atol=1e-5)
    assert not np.asarray(model[:, 2:]).any() and not np.asarray(model[..., 2:]).any()
    sampled = np.random.default_rng(0).normal(size=(2, 6, 4)).astype(np.float32)  # what π₀ samples
    np.testing.assert_allclose(io.to_env(sampled, np.zeros((2, 3))), sampled[:, :2, :2] * 2.0, atol=1e-5)
    np.testing.assert_array_equal(io.executed(sampled), sampled[:, :2, :2])
    np.testing.assert_array_equal(io.step_weights(np.ones((2, 2))), [[1, 1, 0, 0, 0, 0]] * 2)
    mask = np.zeros((6, 4))
    mask[:2, :2] = 1
    np.testing.assert_array_equal(io.executed_mask(), mask)
    with pytest.raises(ValueError, match="--action-horizon between 1 and --model-horizon"):
        pi0.EnvIO(config, table, stats, action_dim=2, horizon=7)
