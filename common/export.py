"""Export π₀ as an openpi checkpoint: the layout openpi's training writes for one step (`training/checkpoints.py`),
without the train state, so that openpi serves or fine-tunes it and our scripts start from it.

    python -m common.export runs/push__acrlpd_pi0__1__1764500000 exports/push_pi0

SRC is a run folder of these scripts (args.json + checkpoints/: its last checkpoint's π₀ and norm stats) or an openpi
checkpoint directory (params/ + assets/<asset_id>/norm_stats.json). OUT_DIR must be new or empty; it receives

    OUT_DIR/params/                              orbax PyTree checkpoint (OCDBT) of {"params": π₀'s nested dict}
                                                 in openpi's layout (PaliGemma/llm/layers/attn/q_einsum/w, ...),
                                                 float32 leaves: what openpi's `model.restore_params` reads
    OUT_DIR/assets/<asset_id>/norm_stats.json    {"norm_stats": {"state": {"mean", "std", "q01", "q99"},
                                                 "actions": {...}}}, indent 2, as openpi's `normalize.save`
    OUT_DIR/pi0rl.json                           how π₀'s prompts were made (prompt length, π₀.₅'s state in the
                                                 prompt or not) and its chunk length: read back by --pi0-checkpoint,
                                                 ignored by openpi (its TrainConfig says the same: see README)

The asset id defaults to the run's env (libero: "physical-intelligence/libero", openpi's) or to the source
checkpoint's only asset; --asset-id chooses it (for an openpi source, the asset read and written). Everything is
written in OUT_DIR.partial-<pid> and renamed to OUT_DIR at the end: a killed export leaves no half checkpoint at
OUT_DIR (only that folder, which can be deleted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common import RunError, pi0, runlog

FULL_VOCAB = 257_152  # PaliGemma's vocabulary: openpi's model configs assume it


def _stats_json(stats: dict[str, dict[str, np.ndarray]]) -> str:
    """openpi's norm_stats.json (its pydantic NormStats dumped with indent 2: q01/q99 null when absent)."""
    out = {k: {s: None if v.get(s) is None else np.asarray(v[s], np.float32).tolist()
               for s in ("mean", "std", "q01", "q99")} for k, v in stats.items()}  # fmt: skip
    return json.dumps({"norm_stats": out}, indent=2)


def export(src: str, out_dir: str, asset_id: str | None = None) -> str:
    """Write π₀ and the norm stats of `src` (a run folder or an openpi checkpoint) to the new or empty `out_dir` as an
    openpi checkpoint (module docstring); returns the one-line summary (sizes, asset id, path, how to use it)."""
    src, out = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(out_dir))
    if not os.path.isdir(src):
        raise RunError(f"{src}: no such folder; pass a run folder (args.json, checkpoints/) or an openpi checkpoint")
    run_folder = os.path.isfile(os.path.join(src, "args.json")) and os.path.isdir(os.path.join(src, "checkpoints"))
    if not run_folder and not os.path.isfile(os.path.join(src, "params", "_METADATA")):
        raise RunError(
            f"{src} is neither a run folder of these scripts (args.json and checkpoints/) nor an openpi checkpoint "
            f"(params/ with _METADATA); found {sorted(os.listdir(src))[:10]}"
        )
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise RunError(f"{out} already exists and is not empty: it is left as it is; pass a new or empty OUT_DIR")
    if run_folder:
        try:
            with open(os.path.join(src, "args.json")) as f:
                run = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{src}/args.json: unreadable ({e}); is this a run folder of these scripts?") from None
        horizon = run.get("model_horizon") or run.get("action_horizon") or 50
        asset_id = asset_id or ("physical-intelligence/libero" if run["env"] == "libero" else run["env"])
    else:
        if asset_id is None and len(found := pi0.asset_ids(src)) != 1:
            raise RunError(f"{src}/assets holds the norm stats {found or 'of no asset'}: choose one with --asset-id")
        horizon, asset_id = None, asset_id or found[0]
    if os.path.isabs(asset_id) or ".." in asset_id.split("/") or not asset_id.strip("/"):
        raise RunError(f"--asset-id {asset_id!r}: a relative path under assets/ (physical-intelligence/libero)")
    params, cfg, stats = runlog.load_pi0(src, horizon or 50, asset_id=None if run_folder else asset_id)
    pi0.check_params(params, cfg)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # openpi's full fine-tuning keeps float32
    bad = [jax.tree_util.keystr(p, simple=True, separator="/")
           for p, x in jax.tree_util.tree_leaves_with_path(params) if not jnp.isfinite(x).all()]  # fmt: skip
    bad += [f"norm stats {k}/{s}" for k, v in stats.items() for s, x in v.items() if not np.isfinite(x).all()]
    if bad:
        raise RunError(f"{src}: NaN or inf in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing exported")

    import orbax.checkpoint as ocp

    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt = ocp.PyTreeCheckpointer()  # jax arrays, as openpi's training saves them
        ckpt.save(os.path.join(tmp, "params"), {"params": params})
        ckpt.close()
        runlog.atomic_write(os.path.join(tmp, "assets", asset_id, "norm_stats.json"), _stats_json(stats).encode())
        record = {"max_token_len": cfg.max_token_len, "discrete_state": cfg.state_in_prompt, "action_horizon": horizon}
        runlog.atomic_write(os.path.join(tmp, runlog.EXPORT_RECORD), json.dumps(record, indent=2).encode())
        os.replace(tmp, out)  # onto a missing or empty folder only: never over what someone put there meanwhile
    except Exception as e:  # a full disk, a folder that appeared: one line
        raise RunError(f"writing {out} failed ({runlog._reason(e)}); nothing was written there") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    model = "π₀.₅" if cfg.pi05 else "π₀"
    sizes = (f"VLM {cfg.vlm.width}×{cfg.vlm.depth}, expert {cfg.expert.width}, action dim {cfg.action_dim}, "
             f"horizon {horizon if horizon else 'not stored (openpi: the model config)'}")  # fmt: skip
    line = (f"exported {pi0.param_count(params):,} parameters ({model}: {sizes}) and the norm stats {asset_id!r} to "
            f"{out}; use it here with --pi0-checkpoint {out} --asset-id {asset_id}, in openpi as a TrainConfig's "
            f"checkpoint dir (weights: CheckpointWeightLoader('{out}/params'))")  # fmt: skip
    if cfg.vocab_size != FULL_VOCAB or not cfg.cameras:
        cams = "no cameras" if not cfg.cameras else f"ViT {cfg.vit.width}×{cfg.vit.depth}"
        line += (f"; not the full-size model: openpi needs a model config with these sizes (vocab {cfg.vocab_size}, "
                 f"{cams}, Gemma head dim {cfg.vlm.head_dim}, {cfg.vlm.num_heads} heads)")  # fmt: skip
    return line


@dataclasses.dataclass
class Args:
    """Export π₀ and its norm stats as an openpi checkpoint (OUT_DIR/params, OUT_DIR/assets/<asset_id>)."""

    src: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")]
    """a run folder of these scripts (args.json, checkpoints/) or an openpi checkpoint directory"""
    out_dir: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT_DIR")]
    """the openpi checkpoint to write: a new or empty folder"""
    asset_id: str | None = None
    """norm-stats asset to write (and, for an openpi SRC, to read); default: the run's env (libero:
    physical-intelligence/libero) or the SRC's only asset"""


def main(args: Args) -> str:
    warnings.filterwarnings("ignore", "Sharding info not provided")  # orbax, restoring on the machine that saved
    line = export(args.src, args.out_dir, args.asset_id)
    print(line, flush=True)
    return line


if __name__ == "__main__":
    with runlog.one_line_errors():
        main(tyro.cli(Args, prog="python -m common.export"))
