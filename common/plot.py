"""Curves of run folders: `python -m common.plot RUN_DIR [RUN_DIR ...] [--out FILE.png] [--keys ...]`.

Reads each folder's metrics.jsonl (and args.json). Top panel: the metrics `--keys` names (default every eval/ key
ending in success_rate: best-of-N and plain π₀ for acrlpd_pi0) against the update step; bottom panel: the losses
(losses/*). Runs whose args.json agree except for the seed (and where they ran and logged) are one config: one line,
their mean, with a band (min–max, or ±std) when there are several seeds. Writes a PNG (matplotlib: the `video`
extra).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Annotated, Any, Literal

import numpy as np
import tyro

from common import RunError

# args.json fields that do not change what a run computes (where it runs and logs): runs differing only there and in
# the seed are seeds of one config
NOT_CONFIG = ("seed", "run_dir", "exp_name", "resume", "track", "wandb_project", "fsdp_devices", "eval_envs", "remat")
NOT_CONFIG += ("capture_video", "video_episodes")
STYLES, MARKERS = ("-", "--", ":", "-."), ("o", "s", "^", "D", "v", "x")  # a metric's line


@dataclasses.dataclass
class RunMetrics:
    """One run folder's name, flags (args.json, {} without it) and metrics: {key: {step: value}}."""

    name: str
    args: dict[str, Any]
    metrics: dict[str, dict[int, float]]


def read_run(folder: str) -> RunMetrics:
    """A run folder's metrics.jsonl (a partial last line, from a kill, is skipped) and args.json."""
    file = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(file):
        raise RunError(f"{folder}: no metrics.jsonl, so not a run folder of these scripts (runs/<env>__<name>__...)")
    metrics: dict[str, dict[int, float]] = {}
    with open(file) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    metrics.setdefault(k, {})[int(row["step"])] = float(v)
    args = {}
    if os.path.isfile(os.path.join(folder, "args.json")):
        with open(os.path.join(folder, "args.json")) as f:
            args = json.load(f)
    return RunMetrics(os.path.basename(os.path.normpath(folder)), args, metrics)


def configs(runs: list[RunMetrics]) -> dict[str, list[RunMetrics]]:
    """The runs grouped by config (args.json less `NOT_CONFIG`), each named by its script, env and the flags that
    differ from the other configs of that script (a run without args.json: its folder's name)."""
    key = lambda r: json.dumps({k: v for k, v in r.args.items() if k not in NOT_CONFIG}, sort_keys=True, default=str)
    groups: dict[str, list[RunMetrics]] = {}
    for r in runs:
        groups.setdefault(key(r) if r.args else r.name, []).append(r)
    flags = [{k: v for k, v in rs[0].args.items() if k not in NOT_CONFIG} for rs in groups.values()]
    named = {}
    for rs, f in zip(groups.values(), flags, strict=True):
        if not rs[0].args:
            named[rs[0].name] = rs
            continue
        peers = [g for g in flags if g.get("_script") == f.get("_script") and g is not f]
        differ = [k for k in f if k != "_script" and any(k in g and g[k] != f[k] for g in peers)]
        what = [f"--{k.replace('_', '-')} {f[k]}" for k in differ[:4]] + (["…"] if len(differ) > 4 else [])
        name = " ".join([f.get("_script", "run"), str(f.get("env", "")), *what])
        named[name + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")] = rs
    return named


def curve(runs: list[RunMetrics], key: str, band: str) -> tuple[np.ndarray, ...] | None:
    """(steps, mean, low, high) of `key` over the runs at each step any of them logged it (low, high: min–max or mean
    ± std), or None when none did."""
    steps = sorted({s for r in runs for s in r.metrics.get(key, {})})
    if not steps:
        return None
    values = [[r.metrics[key][s] for r in runs if s in r.metrics.get(key, {})] for s in steps]
    mean = np.array([np.mean(v) for v in values])
    if band == "std":
        std = np.array([np.std(v) for v in values])
        return np.array(steps), mean, mean - std, mean + std
    return np.array(steps), mean, np.array([min(v) for v in values]), np.array([max(v) for v in values])


def plot(
    run_dirs: list[str], out: str = "plot.png", keys: tuple[str, ...] = ("eval/*success_rate",), band: str = "minmax"
) -> str:
    """Draw the runs' `keys` (fnmatch patterns) and their losses into the PNG `out`; returns its path."""
    runs = [read_run(d) for d in run_dirs]  # a folder without metrics is refused before matplotlib is needed
    try:
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise RunError("common.plot needs matplotlib: pip install -e '.[video]'") from None
    groups = configs(runs)
    every = sorted({k for r in runs for k in r.metrics})
    top = [k for k in every if any(fnmatch.fnmatch(k, p) for p in keys)]
    losses = [k for k in every if k.startswith("losses/")]
    if not top and not losses:
        raise RunError(f"{', '.join(run_dirs)}: no metric matches {' '.join(keys)} and no losses/* were logged yet")
    style = lambda j: dict(ls=STYLES[j % len(STYLES)], marker=MARKERS[j % len(MARKERS)])  # metric j's line
    fig = Figure(figsize=(11, 7), layout="constrained")
    ax_top, ax_loss = fig.subplots(2, 1, sharex=True)
    for i, rs in enumerate(groups.values()):
        for ax, ks in ((ax_top, top), (ax_loss, losses)):
            for j, k in enumerate(ks):
                if (c := curve(rs, k, band)) is not None:
                    steps, mean, low, high = c
                    ax.plot(steps, mean, color=f"C{i % 10}", **style(j))
                    if len(rs) > 1:
                        ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.2, linewidth=0)
    for ax, ks, label in ((ax_top, top, " ".join(keys)), (ax_loss, losses, "losses/*")):
        ax.grid(alpha=0.3)
        ax.set_ylabel(label)
        proxies = [Line2D([], [], color="k", **style(j)) for j in range(len(ks))]
        ax.legend(proxies, ks, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="metric")
    ax_loss.set_yscale("symlog", linthresh=1e-2)
    ax_loss.set_xlabel("step (updates)")
    proxies = [Line2D([], [], color=f"C{i % 10}", lw=3) for i in range(len(groups))]
    title = f"run: the mean over its seeds, band {'min–max' if band == 'minmax' else '± std'}"
    fig.legend(proxies, list(groups), fontsize=8, loc="outside lower center", title=title)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


@dataclasses.dataclass
class PlotArgs:
    """Plot run folders' success curves and losses (one line per config; seeds averaged, with a band)."""

    run_dirs: Annotated[list[str], tyro.conf.Positional]
    """run folders (runs/<env>__<name>__<seed>__<time>)"""
    out: str = "plot.png"
    """the PNG written"""
    keys: tuple[str, ...] = ("eval/*success_rate",)
    """metrics of the top panel, fnmatch patterns (e.g. eval/*return charts/*)"""
    band: Literal["minmax", "std"] = "minmax"
    """the band around a config's mean over seeds: min–max, or ± one std"""


def main(argv: list[str] | None = None) -> None:
    from common import runlog

    with runlog.one_line_errors():
        a = tyro.cli(PlotArgs, args=argv)
        print(f"-> {plot(a.run_dirs, a.out, a.keys, a.band)}")


if __name__ == "__main__":
    main()
