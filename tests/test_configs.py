"""Each script's named per-env configs: push's are the dataclass defaults, --env picks a config on the command line,
--help shows its values, and a run says where its env's config differs from the defaults."""

import dataclasses

import pytest

import acrlpd_pi0
import chunk_awr
import dsrl_pi0
import flow_ppo
from common import runlog

SCRIPTS = (acrlpd_pi0, chunk_awr, flow_ppo, dsrl_pi0)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_push_config_is_the_defaults_and_every_config_sets_the_same_flags(script):
    assert script.CONFIGS["push"] == script.Args()
    assert set(script.CONFIGS) == {"push", "libero", "gym"}
    base = script.Args()
    differ = {
        name: {f.name for f in dataclasses.fields(base) if getattr(cfg, f.name) != getattr(base, f.name)}
        for name, cfg in script.CONFIGS.items()
    }
    assert differ["push"] == set()
    assert {"env", "action_horizon", "eval_envs", "pi0_preset"} <= differ["libero"]
    assert script.CONFIGS["libero"].pi0_preset == "pi0" and script.CONFIGS["gym"].pi0_preset == "cpu"
    for name in ("lr", "action_horizon", "eval_episodes", "eval_envs", "log_every", "eval_every", "save_every"):
        assert isinstance(getattr(base, name), int | float), name  # the same flags in every script, real values


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_cli_parses_over_the_env_config(script):
    libero = runlog.cli(script.Args, script.CONFIGS, ["--env", "libero", "--seed", "7"])
    assert libero == dataclasses.replace(script.CONFIGS["libero"], seed=7)
    gym = runlog.cli(script.Args, script.CONFIGS, ["--env=Pendulum-v1", "--action-horizon", "3"])
    assert gym == dataclasses.replace(script.CONFIGS["gym"], env="Pendulum-v1", action_horizon=3)
    assert runlog.cli(script.Args, script.CONFIGS, []) == script.Args()


def test_help_shows_the_env_configs_values(capsys):
    with pytest.raises(SystemExit):
        runlog.cli(acrlpd_pi0.Args, acrlpd_pi0.CONFIGS, ["--env", "libero", "--help"])
    libero = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        runlog.cli(acrlpd_pi0.Args, acrlpd_pi0.CONFIGS, ["--help"])
    push = " ".join(capsys.readouterr().out.split())
    assert "(default: 32)" in libero.split("--bon INT", 1)[1][:200]
    assert "(default: 8)" in push.split("--bon INT", 1)[1][:200]
    assert "(preset)" not in push and "None" not in push.split("--bon INT", 1)[1][:200]


def test_a_run_prints_where_its_config_differs(capsys, tmp_path):
    (tmp_path / "d.h5").touch()
    args = runlog.configured(chunk_awr.CONFIGS, "Pendulum-v1", dataset=str(tmp_path / "d.h5"))
    runlog.prepared(args, "chunk_awr", chunk_awr.CONFIGS, data_with_checkpoint="needed")
    assert "config gym: --eval-envs 16 (the rest: the defaults, see --help)" in capsys.readouterr().out
    runlog.prepared(chunk_awr.Args(), "chunk_awr", chunk_awr.CONFIGS, data_with_checkpoint="needed")
    assert "config" not in capsys.readouterr().out  # push: the defaults
