"""Test-wide settings: wandb never goes online, plots never open a window, and XLA compilations are cached on disk
so a second run of the suite compiles little (the cache lives in ~/.cache/pi0rl/jax_cache, or $PI0RL_JAX_CACHE)."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("PI0RL_JAX_CACHE", os.path.expanduser("~/.cache/pi0rl/jax_cache"))
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
