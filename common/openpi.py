"""openpi interop: π₀ checkpoints in its layout (openpi's own and our run folders: parameters, norm stats, the config
read off the shapes), its PaliGemma tokenizer, its and LeRobot's caches, LeRobot datasets (openpi's data format), and
export back to an openpi checkpoint.
Imported only by runs that use one of these.

    python -m common.openpi SRC OUT_DIR [--asset-id ID]     # a run folder or an openpi checkpoint -> openpi layout
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Annotated, Any

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from common import RunError, pi0, runlog
from common.data import DatasetError, EpisodeData, refuse_non_finite

LIBERO_REPO = "physical-intelligence/libero"  # openpi's LIBERO data on the Hugging Face hub (LeRobot format)
# What openpi's LIBERO configs say of their checkpoints, which store no config (training/config.py): the chunk length,
# and that pi05_libero was trained without the state in its prompt (discrete_state_input=False)
OPENPI_LIBERO = {"pi0_libero": {"action_horizon": 50}, "pi05_libero": {"action_horizon": 10, "discrete_state": False}}
EXPORT_RECORD = "pi0rl.json"  # beside an exported openpi checkpoint: how its prompts are made (openpi ignores it)
NOISE_POLICY = "noise_policy"  # beside it, for a run that steers π₀ through its noise: <NOISE_POLICY>.npz and .json
FULL_VOCAB = 257_152  # PaliGemma's vocabulary: openpi's model configs assume it


# ----------------------------------------------------------------------------------------------------- caches
def openpi_home() -> str:
    """openpi's cache (openpi/shared/download.py): $OPENPI_DATA_HOME, default ~/.cache/openpi."""
    return os.path.abspath(os.path.expanduser(os.environ.get("OPENPI_DATA_HOME", "~/.cache/openpi")))


def lerobot_home() -> str:
    """LeRobot's cache: $HF_LEROBOT_HOME, default $HF_HOME/lerobot (HF_HOME: else $XDG_CACHE_HOME/huggingface)."""
    if "HF_LEROBOT_HOME" in os.environ:
        return os.path.abspath(os.path.expanduser(os.environ["HF_LEROBOT_HOME"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    hf_home = os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))
    return os.path.abspath(os.path.join(os.path.expanduser(hf_home), "lerobot"))


def checkpoint_record(checkpoint: str) -> dict[str, Any]:
    """What is known of how an openpi-layout checkpoint was trained (openpi stores no config): our export's record
    (`EXPORT_RECORD`), over `OPENPI_LIBERO`'s entry for a folder name on the path."""
    names = os.path.abspath(os.path.expanduser(checkpoint)).split(os.sep)
    record = next((dict(r) for n in names for name, r in OPENPI_LIBERO.items() if n.startswith(name)), {})
    if os.path.isfile(file := os.path.join(checkpoint, EXPORT_RECORD)):
        with open(file) as f:
            record.update({k: v for k, v in json.load(f).items() if v is not None})
    return record


def located(args: Any, *, data_with_checkpoint: str = "needed") -> Any:
    """`args` with π₀'s preset chosen (None: pi0 for --env libero, else cpu) and, for --env libero, the inputs left
    unset found where openpi and LeRobot put them (nothing is downloaded):
      --pi0-checkpoint  $OPENPI_DATA_HOME/openpi-assets/checkpoints/<preset>_libero (pi0 / pi05 presets)
      --tokenizer       $OPENPI_DATA_HOME/big_vision/paligemma_tokenizer.model (for an openpi checkpoint)
      --dataset         $HF_LEROBOT_HOME/physical-intelligence/libero, else LeRobot's hub snapshots (newest first)
    A run folder given as --pi0-checkpoint lends its --tokenizer, an openpi one its --model-horizon where
    `checkpoint_record` knows it. A resumed run keeps its own. What is needed and not found is one RunError listing
    the paths looked at. The data is looked for unless a checkpoint is used and `data_with_checkpoint` is "unused",
    and needed unless it is "optional"."""
    preset = args.pi0_preset or ("pi0" if args.env == "libero" else "cpu")
    found: dict[str, Any] = {"pi0_preset": preset}
    if args.resume:  # a resumed run keeps what it found when it started (args.json)
        return dataclasses.replace(args, **found)
    home, missing = openpi_home(), []

    def first(flag: str, paths: list[str], kind: str = "dir") -> str | None:
        hit = next((p for p in paths if (os.path.isdir if kind == "dir" else os.path.isfile)(p)), None)
        if hit:
            print(f"--env libero: {flag} {hit} (found in the cache)")
        else:
            missing.append((flag, paths))
        return hit

    checkpoint = args.pi0_checkpoint
    if args.env == "libero" and checkpoint is None and preset in ("pi0", "pi05"):
        checkpoint = found["pi0_checkpoint"] = first(
            "--pi0-checkpoint", [os.path.join(home, "openpi-assets", "checkpoints", f"{preset}_libero")]
        )
    ckpt = os.path.expanduser(checkpoint or "")
    run_folder = bool(ckpt) and os.path.isdir(os.path.join(ckpt, "checkpoints"))
    if run_folder and args.tokenizer is None and os.path.isfile(file := os.path.join(ckpt, "args.json")):
        with open(file) as f:
            found["tokenizer"] = json.load(f).get("tokenizer")  # the prompts its π₀ learned from
    horizon = checkpoint_record(ckpt).get("action_horizon") if ckpt and not run_folder else None
    if horizon and not args.model_horizon:  # the chunk it was trained on
        found["model_horizon"] = horizon
        print(f"--pi0-checkpoint {checkpoint}: trained on {horizon}-action chunks: --model-horizon {horizon}")
    if args.env != "libero":
        return dataclasses.replace(args, **found)
    if checkpoint and not run_folder and args.tokenizer is None:
        found["tokenizer"] = first(
            "--tokenizer", [os.path.join(home, "big_vision", "paligemma_tokenizer.model")], kind="file"
        )
    if args.dataset is None and not (checkpoint and data_with_checkpoint == "unused"):
        hub = os.path.join(lerobot_home(), "hub", f"datasets--{LIBERO_REPO.replace('/', '--')}", "snapshots")
        snapshots = sorted(glob.glob(os.path.join(hub, "*")), key=os.path.getmtime, reverse=True)
        paths = [os.path.join(lerobot_home(), *LIBERO_REPO.split("/")), *(snapshots or [os.path.join(hub, "*")])]
        found["dataset"] = first("--dataset", paths)
        if found["dataset"] is None and checkpoint and data_with_checkpoint == "optional":
            missing.pop()  # optional here: start from π₀ with no prior data
            print(f"--env libero: no prior data (looked at {', '.join(paths)}): starting from π₀ alone")
    if missing:
        lines = [f"{flag} (looked at: {', '.join(paths)})" for flag, paths in missing]
        raise RunError(
            "--env libero: not found in openpi's or LeRobot's cache (nothing is downloaded): "
            + "; ".join(lines)
            + ". Pass the flags, or point OPENPI_DATA_HOME / HF_LEROBOT_HOME at the caches. To fill them on a machine "
            "with internet: in openpi's env, python -c \"from openpi.shared import download; "
            "download.maybe_download('gs://openpi-assets/checkpoints/pi0_libero'); "
            "download.maybe_download('gs://big_vision/paligemma_tokenizer.model')\" and, in LeRobot's, python -c "
            '"from lerobot.datasets.lerobot_dataset import LeRobotDataset; '
            "LeRobotDataset('physical-intelligence/libero')\""
        )
    return dataclasses.replace(args, **found)


# ----------------------------------------------------------------------------------------------------- LeRobot data
LEROBOT_IMAGE_SIZE = 128  # LeRobot images are read resized to this unless told (all of openpi's LIBERO at 256²: ~90 GB)


def lerobot_tasks(meta: Path) -> dict[int, str]:
    """{task_index: task} of a LeRobot `meta/tasks.jsonl` ({} without one)."""
    if not meta.exists():
        return {}
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return {int(row["task_index"]): row["task"] for row in rows}


def _decode_image(cell: Any, size: int | None) -> np.ndarray:
    """A LeRobot image cell ({"bytes": PNG/JPEG, "path"}, raw bytes, or a nested [h][w][3] list) -> uint8 [h, w, 3]."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if isinstance(data, bytes | bytearray):
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        if size and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, np.uint8)
    if data is None:
        raise ValueError("image cell without bytes (LeRobot video datasets store frames in mp4; not supported)")
    arr = np.asarray(data, np.uint8)
    if size and arr.shape[:2] != (size, size):
        from PIL import Image

        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR), np.uint8)
    return arr


def load_lerobot(
    path: str | os.PathLike,
    prompts: list[str] | None = None,
    max_episodes: int | None = None,
    image_keys: dict[str, str] | None = None,
    image_size: int | None = None,
) -> EpisodeData:
    """A LeRobot dataset (`data/**/*.parquet`, `meta/tasks.jsonl`): columns `state`, `actions`, `episode_index`,
    `frame_index`, `task_index` and the image columns `image_keys` maps to cameras (default openpi's LIBERO; {}:
    none), kept upright and resized to `image_size`² when given. Rewards and terminations from `next.reward` /
    `next.done`, else a demo's last frame is a success (as LIBERO's HDF5 demos). Prompts: `prompts`, then the
    tasks not in it (without `prompts`, prompt_id = task_index)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError('load_lerobot needs pyarrow: pip install -e ".[libero]"') from err
    root = Path(path)
    data = root / "data" if (root / "data").is_dir() else root  # meta/ may hold parquet files too (LeRobot v3)
    files = sorted(data.glob("**/*.parquet")) if root.is_dir() else [root]
    if not files or not files[0].exists():
        raise DatasetError(f"{root}: no parquet files (expected a LeRobot dataset folder with data/**/*.parquet)")
    meta = root / "meta" / "tasks.jsonl"  # or the first parent's: meta/ may sit above the folder given
    for parent in [root, *root.parents][:4]:
        if (parent / "meta" / "tasks.jsonl").exists():
            meta = parent / "meta" / "tasks.jsonl"
            break
    task_text = lerobot_tasks(meta)
    image_keys = {"image": "base_0_rgb", "wrist_image": "left_wrist_0_rgb"} if image_keys is None else image_keys
    prompts = list(prompts or [])
    prompts += [task_text[t] for t in sorted(task_text) if task_text[t] not in prompts]  # task_index order
    cols: dict[str, list] = {}
    episodes_seen: list[int] = []
    for f in files:
        table = pq.read_table(f)
        names = set(table.column_names)
        need = {"state", "actions", "episode_index"} | set(image_keys)
        if need - names:
            raise DatasetError(f"{f}: missing columns {sorted(need - names)}; it has {sorted(names)}")
        ep = table.column("episode_index").to_numpy()
        keep = np.ones(len(ep), bool)
        if max_episodes is not None:
            new = [int(x) for x in dict.fromkeys(ep.tolist()) if int(x) not in episodes_seen]
            allowed = set(episodes_seen) | set(new[: max(0, max_episodes - len(episodes_seen))])
            keep = np.isin(ep, list(allowed))
            if not keep.any():
                break
        episodes_seen += [int(x) for x in dict.fromkeys(ep[keep].tolist()) if int(x) not in episodes_seen]
        for name in need | ({"frame_index", "task_index", "next.reward", "next.done"} & names):
            values = table.column(name).to_pylist()
            cols.setdefault(name, []).extend(v for v, k in zip(values, keep, strict=True) if k)
    if not cols:
        raise DatasetError(f"{root}: no frames read")
    ep = np.asarray(cols["episode_index"], np.int64)
    frame = np.asarray(cols.get("frame_index", np.arange(len(ep))), np.int64)
    order = np.lexsort((frame, ep))  # group by episode, frames in time order
    ep = ep[order]
    starts = np.flatnonzero(np.r_[True, ep[1:] != ep[:-1]])
    lengths = np.diff(np.r_[starts, len(ep)])
    n = len(ep)
    task_idx = np.asarray(cols.get("task_index", np.zeros(n)), np.int64)[order]
    prompt_id = np.zeros(n, np.int32)
    for t in np.unique(task_idx):
        text = task_text.get(int(t), f"task {int(t)}")
        if text not in prompts:
            prompts.append(text)
        prompt_id[task_idx == t] = prompts.index(text)
    last = np.zeros(n, bool)
    last[starts + lengths - 1] = True
    if "next.reward" in cols:
        rewards = np.asarray(cols["next.reward"], np.float32)[order]
    else:
        rewards = last.astype(np.float32)
    terminals = np.asarray(cols["next.done"], bool)[order] if "next.done" in cols else last
    obs = {
        "state": np.asarray([cols["state"][i] for i in order], np.float32).reshape(n, -1),
        "prompt_id": prompt_id,
        "images": {
            cam: np.stack([_decode_image(cols[key][i], image_size) for i in order]) for key, cam in image_keys.items()
        },
    }
    actions = np.asarray([cols["actions"][i] for i in order], np.float32).reshape(n, -1)
    data = EpisodeData(
        obs=obs,
        actions=actions,
        rewards=rewards,
        terminals=terminals,
        subgoal=np.zeros(n, bool),
        episode_starts=starts.astype(np.int64),
        episode_lengths=lengths.astype(np.int64),
        truncated=np.zeros(len(starts), bool),
        prompts=prompts,
    )
    refuse_non_finite(path, data)
    return data


# ----------------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(RunError):
    """An openpi checkpoint that cannot be used as asked; the message says what was wrong and how to fix it."""


def _params_dir(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    for cand in (os.path.join(path, "params"), path):
        if os.path.isfile(os.path.join(cand, "_METADATA")) or os.path.isfile(os.path.join(cand, "manifest.ocdbt")):
            return cand
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    raise CheckpointError(
        f"{path!r} is not an openpi checkpoint: expected an orbax checkpoint in {path}/params "
        f"(with _METADATA); found {sorted(os.listdir(path))[:10]}"
    )


def config_from_params(
    params: pi0.Params, *, action_horizon: int, max_token_len: int, **overrides: Any
) -> pi0.Pi0Config:
    """The `pi0.Pi0Config` the parameter shapes determine; horizon and token length must be given."""
    try:
        pg, llm = params["PaliGemma"], params["PaliGemma"]["llm"]
        attn, layers = llm["layers"]["attn"], llm["layers"]

        def gemma(i: int) -> pi0.GemmaConfig:
            s = "" if i == 0 else f"_{i}"
            if f"q_einsum{s}" in attn:
                q, kv = attn[f"q_einsum{s}"]["w"].shape, attn[f"kv_einsum{s}"]["w"].shape
                depth, heads, width, head_dim, kv_heads = q[0], q[1], q[2], q[3], kv[2]
            else:
                qkv = attn[f"qkv_einsum{s}"]["w"].shape
                depth, heads, width, head_dim, kv_heads = qkv[0], qkv[2], qkv[3], qkv[4], qkv[2]
            mlp = layers[f"mlp{s}"]["gating_einsum"].shape[-1]
            return pi0.GemmaConfig(width, depth, mlp, heads, kv_heads, head_dim)

        vit, cams = pi0.PRESETS["cpu"].vit, ()
        if "img" in pg:
            img = pg["img"]
            blk = img["Transformer"]["encoderblock"]
            patch, width = img["embedding"]["kernel"].shape[0], img["embedding"]["kernel"].shape[-1]
            vit = pi0.SigLIPConfig(
                width=width,
                depth=blk["LayerNorm_0"]["scale"].shape[0],
                mlp_dim=blk["MlpBlock_0"]["Dense_0"]["kernel"].shape[-1],
                num_heads=blk["MultiHeadDotProductAttention_0"]["query"]["kernel"].shape[2],
                patch_size=patch,
                image_size=int(math.isqrt(img["pos_embedding"].shape[1])) * patch,
            )
            cams = pi0.CAMERAS
        fields = dict(
            vlm=gemma(0),
            expert=gemma(1),
            vit=vit,
            pi05="time_mlp_in" in params,
            vocab_size=llm["embedder"]["input_embedding"].shape[0],
            action_dim=params["action_in_proj"]["kernel"].shape[0],
            action_horizon=action_horizon,
            state_dim=params["state_proj"]["kernel"].shape[0] if "state_proj" in params else None,
            max_token_len=max_token_len,
            cameras=cams,
        )
    except KeyError as e:
        raise CheckpointError(f"parameter {e} missing: this is not a π₀/π₀.₅ parameter tree") from None
    return pi0.Pi0Config(**{**fields, **overrides})


def check_params(params: pi0.Params, config: pi0.Pi0Config) -> None:
    """Raise CheckpointError naming missing, extra and mis-shaped parameters against what `config` builds."""
    expected = jax.eval_shape(pi0.Pi0(dataclasses.replace(config, param_dtype="float32")).init, jax.random.key(0))
    flat = lambda t: {
        jax.tree_util.keystr(p, simple=True, separator="/"): x.shape for p, x in jax.tree_util.tree_leaves_with_path(t)
    }
    want, got = flat(expected), flat(params)
    problems = [
        f"{k}: checkpoint has shape {tuple(got[k])}, the requested model needs {tuple(want[k])}"
        for k in sorted(want.keys() & got.keys())
        if tuple(got[k]) != tuple(want[k])
    ]
    problems += [f"missing {k} (expected shape {want[k]})" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise CheckpointError(
            "the checkpoint does not fit the requested π₀ model:\n  "
            + "\n  ".join(problems[:12])
            + more
            + "\n(check --pi0-preset, --action-horizon and the π₀ / π₀.₅ choice)"
        )


def load_openpi_params(
    path: str,
    *,
    action_horizon: int = 50,
    max_token_len: int = 48,
    expect: pi0.Pi0Config | None = None,
    dtype: str = "float32",
) -> tuple[pi0.Params, pi0.Pi0Config]:
    """`<path>/params` (orbax, openpi's layout) -> (params, config read off the shapes). `expect`: a config every
    shape must match. `dtype`: the parameters' and the compute's (bfloat16 serves a full π₀ on one GPU)."""
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():  # orbax: "Sharding info not provided" (we place the arrays ourselves)
        warnings.filterwarnings("ignore", "Sharding info not provided")
        restored = ocp.PyTreeCheckpointer().restore(_params_dir(path))
    params = restored.get("params", restored) if isinstance(restored, dict) else restored
    # openpi's nnx states store leaves as {"value": array}; keep the plain tree
    params = jax.tree.map(
        lambda x: x["value"] if isinstance(x, dict) else x,
        params,
        is_leaf=lambda x: isinstance(x, dict) and set(x) == {"value"},
    )
    sizes = dict(action_horizon=action_horizon, max_token_len=max_token_len)
    config = config_from_params(params, **sizes, dtype=dtype, param_dtype=dtype)
    if expect is not None:
        check_params(params, dataclasses.replace(expect, **sizes))
        config = dataclasses.replace(expect, **sizes, dtype=dtype, param_dtype=dtype)
    check_params(params, config)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return params, config


def asset_ids(path: str) -> list[str]:
    """The assets of an openpi checkpoint that hold a norm_stats.json (openpi's LIBERO: `LIBERO_REPO`)."""
    assets = os.path.join(os.path.abspath(os.path.expanduser(path)), "assets")
    return sorted(os.path.relpath(d, assets) for d, _, files in os.walk(assets) if "norm_stats.json" in files)


def load_norm_stats(path: str, asset_id: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """`<ckpt>/assets/<asset_id>/norm_stats.json` -> {"state": {"mean", "std", "q01", "q99"}, "actions": {...}}."""
    assets = os.path.join(os.path.abspath(os.path.expanduser(path)), "assets")
    if asset_id is None:
        found = asset_ids(path)
        if len(found) != 1:
            raise CheckpointError(
                f"cannot choose the norm stats in {assets}: found {found or 'none'}; "
                "pass --asset-id (e.g. physical-intelligence/libero)"
            )
        asset_id = found[0]
    file = os.path.join(assets, asset_id, "norm_stats.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"no norm stats at {file}: pass the openpi checkpoint directory and its --asset-id")
    with open(file) as f:
        raw = json.load(f)
    raw = raw.get("norm_stats", raw)
    return {
        k: {s: np.asarray(v[s], np.float32) for s in ("mean", "std", "q01", "q99") if v.get(s) is not None}
        for k, v in raw.items()
    }


def load_pi0(
    path: str, action_horizon: int, *, asset_id: str | None = None, run_config: dict[str, Any] | None = None
) -> tuple[pi0.Params, pi0.Pi0Config, dict[str, dict[str, np.ndarray]]]:
    """(π₀ parameters, config, norm stats) of a --pi0-checkpoint. An openpi checkpoint directory: the prompt's form
    from `checkpoint_record`, else openpi's defaults (π₀.₅: 200 tokens with the state in them; π₀: 48). A run
    folder: its last checkpoint's state["params"] (with the average state["ema"] in place, where the run kept one) and
    extra["norm_stats"], the config read off the shapes, what the run recorded and `run_config` (what the shapes leave
    open; 48 prompt tokens by default)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        params, cfg = load_openpi_params(path, action_horizon=action_horizon, max_token_len=48)
        record = checkpoint_record(path)
        cfg = dataclasses.replace(
            cfg,
            max_token_len=record.get("max_token_len", 200 if cfg.pi05 else 48),
            discrete_state=record.get("discrete_state", cfg.pi05),
        )
        return params, cfg, load_norm_stats(path, asset_id)
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(os.path.join(path, "checkpoints"))
    step = mgr.latest_step()
    if step is None:
        raise RunError(f"--pi0-checkpoint {path}: its checkpoints/ folder is empty (the run saved nothing)")
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), extra=ocp.args.JsonRestore()))
    state, extra = out["state"], out["extra"]
    if not isinstance(state, dict) or "params" not in state or "norm_stats" not in extra:
        raise RunError(
            f"--pi0-checkpoint {path}: expected the π₀ params at state['params'] and extra['norm_stats'] (a run "
            f"folder of these scripts); found state keys {list(state) if isinstance(state, dict) else type(state)}"
        )
    params = jax.tree.map(jnp.asarray, state["params"])
    if state.get("ema"):  # the run averaged π₀'s weights (--ema-decay): the average is its policy
        params = pi0.overlaid(params, jax.tree.map(jnp.asarray, state["ema"]))
    record = extra.get("pi0", {})  # what the run's π₀ read (prompt length, state in the prompt), when recorded
    run_config = dict(run_config or {})
    if "state_proj" in params:  # the shapes fix π₀'s state input (an openpi π₀ pads the env's state to it)
        run_config.pop("state_dim", None)
    cfg = config_from_params(params, action_horizon=action_horizon, **{"max_token_len": 48, **run_config, **record})
    stats = {k: {s: np.asarray(x, np.float32) for s, x in v.items()} for k, v in extra["norm_stats"].items()}
    return params, cfg, stats


def fit_stats(checkpoint: str, cfg: pi0.Pi0Config, stats: dict[str, Any], env: Any, run_folder: bool) -> dict:
    """A checkpoint's norm stats for `env`, or a RunError before any work when the checkpoint was made for another
    env: a run folder's stats must have the env's state and action dims; an openpi checkpoint's at least as many (cut
    to the env's, as openpi does); π₀ must take at least the env's dims."""
    dims = {"actions": env.action_dim, "state": env.state_dim}
    out = dict(stats)
    for key, have in dims.items():
        if key not in stats:
            continue
        d = len(stats[key]["mean"])
        if d < have or (run_folder and d != have):
            raise RunError(
                f"--pi0-checkpoint {checkpoint}: its norm stats have {d} {key} dims, the env has {have} (action "
                f"{env.action_dim}, state {env.state_dim}): use a checkpoint made for this env (or its --asset-id)"
            )
        out[key] = {s: np.asarray(x)[..., :have] for s, x in stats[key].items()}
    if cfg.action_dim < env.action_dim or (cfg.state_dim or cfg.action_dim) < env.state_dim:
        raise RunError(
            f"--pi0-checkpoint {checkpoint}: π₀ takes {cfg.state_dim or cfg.action_dim} state and {cfg.action_dim} "
            f"action dims, fewer than the env's {env.state_dim} and {env.action_dim}: use a checkpoint for this env"
        )
    return out


def start_from(checkpoint: str, env: Any, env_name: str, preset: str, horizon: int, asset_id: str | None) -> tuple:
    """(π₀ parameters, config, norm stats fitted to `env` (`fit_stats`), delta dims) of a --pi0-checkpoint: what a
    run folder's shapes leave open comes from the `preset` and the env, whose cameras π₀ reads where it has any."""
    cams = tuple(env.camera_names)
    rc = dict(max_token_len=pi0.PRESETS[preset].max_token_len, state_dim=env.state_dim, cameras=cams)
    params, cfg, stats = load_pi0(checkpoint, horizon, asset_id=asset_id, run_config=rc)
    cfg = dataclasses.replace(cfg, cameras=cams or cfg.cameras)
    stats = fit_stats(checkpoint, cfg, stats, env, os.path.isdir(os.path.join(checkpoint, "checkpoints")))
    delta = 0
    if env_name == "libero":  # openpi's pi0_libero predicts its first 6 action dims relative to the state
        from common import libero

        delta = libero.openpi_delta_dims(stats)
    return params, cfg, stats, delta


# ----------------------------------------------------------------------------------------------------- tokenizer
class PaligemmaTokenizer:
    """The PaliGemma SentencePiece model with openpi's prompt formats, padded to `max_len` with a mask. π₀: BOS +
    cleaned text, then "\\n" encoded alone; π₀.₅ with the state: BOS + "Task: <text>, State: <bins>;\\nAction: ".

    For jit the π₀.₅ prompt is cut into parts (`state_prefix`, `state_bins`), each read off SentencePiece's encoding
    of a longer string; `pi0.make_prompt_table` checks the parts against the whole-string encoding.
    """

    def __init__(self, model_path: str, max_len: int):
        if not os.path.isfile(model_path):
            raise RunError(
                f"--tokenizer {model_path!r}: no such file; pass the path of "
                "openpi's paligemma_tokenizer.model (it is in openpi's asset cache)"
            )
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.max_len, self.vocab_size = max_len, self.sp.get_piece_size()

    def ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        """The unpadded token ids, computed on the host from whole strings (the reference for the parts)."""
        text = pi0._clean(prompt)
        if state is None:
            return self.sp.encode(text, add_bos=True) + self.sp.encode("\n")
        bins = pi0._digitize(state)
        return self.sp.encode(f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: ", add_bos=True)

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return pi0._pad(self.ids(prompt, state), self.max_len)

    def _after(self, head: str, text: str) -> list[int]:
        """The ids `head + text` encodes to after those of `head` alone (what `text` adds in that context)."""
        base, full = self.sp.encode(head), self.sp.encode(head + text)
        return full[len(base) :] if full[: len(base)] == base else [-1]  # -1: not separable (caught by the check)

    def state_prefix(self, prompt: str) -> list[int]:
        """The ids of a π₀.₅ prompt before its state."""
        return self.sp.encode(f"Task: {pi0._clean(prompt)}, State:", add_bos=True)

    def state_bins(self) -> tuple[list[list[int]], list[list[int]]]:
        """([ids of " <b>" as a middle dim], [ids of " <b>;\\nAction: " as the last dim]), indexed by b + 1 for b in
        [-1, 255]: the same for every prompt."""
        mid = [self._after("State:", f" {b}") for b in pi0.BIN_VALUES]
        return mid, [self._after("State:", f" {b};\nAction: ") for b in pi0.BIN_VALUES]


# ----------------------------------------------------------------------------------------------------- export
def _stats_json(stats: dict[str, dict[str, np.ndarray]]) -> str:
    """openpi's norm_stats.json (its pydantic NormStats dumped with indent 2: q01/q99 null when absent)."""
    keys = ("mean", "std", "q01", "q99")
    out = {
        k: {s: None if v.get(s) is None else np.asarray(v[s], np.float32).tolist() for s in keys}
        for k, v in stats.items()
    }
    return json.dumps({"norm_stats": out}, indent=2)


def export(src: str, out_dir: str, asset_id: str | None = None) -> str:
    """Write π₀ and the norm stats of `src` (a run folder or an openpi checkpoint) to the new or empty `out_dir` as
    openpi's training writes one step: params/ (orbax, float32, openpi's layout), assets/<asset_id>/norm_stats.json,
    and `EXPORT_RECORD` (prompt length, π₀.₅'s state in the prompt, chunk length: read back by --pi0-checkpoint).
    The asset id defaults to the run's env (libero: openpi's) or the source's only asset. Written in a temporary
    folder renamed to `out_dir` at the end. Returns the one-line summary (sizes, asset id, how to use it)."""
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
        asset_id = asset_id or (LIBERO_REPO if run["env"] == "libero" else run["env"])
    else:
        if asset_id is None and len(found := asset_ids(src)) != 1:
            raise RunError(f"{src}/assets holds the norm stats {found or 'of no asset'}: choose one with --asset-id")
        horizon, asset_id = None, asset_id or found[0]
    if os.path.isabs(asset_id) or ".." in asset_id.split("/") or not asset_id.strip("/"):
        raise RunError(f"--asset-id {asset_id!r}: a relative path under assets/ (physical-intelligence/libero)")
    params, cfg, stats = load_pi0(src, horizon or 50, asset_id=None if run_folder else asset_id)
    check_params(params, cfg)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # openpi's full fine-tuning keeps float32
    leaves = jax.tree_util.tree_leaves_with_path(params)
    bad = [jax.tree_util.keystr(p, simple=True, separator="/") for p, x in leaves if not jnp.isfinite(x).all()]
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
        runlog.atomic_write(os.path.join(tmp, EXPORT_RECORD), json.dumps(record, indent=2).encode())
        steering = noise_policy(src, run) if run_folder else None
        if steering is not None:
            weights, about = steering
            runlog.atomic_write(os.path.join(tmp, f"{NOISE_POLICY}.npz"), lambda f: np.savez(f, **weights))
            runlog.atomic_write(os.path.join(tmp, f"{NOISE_POLICY}.json"), json.dumps(about, indent=2).encode())
        os.replace(tmp, out)  # onto a missing or empty folder only: never over what someone put there meanwhile
    except Exception as e:  # a full disk, a folder that appeared: one line
        raise RunError(f"writing {out} failed ({runlog._reason(e)}); nothing was written there") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    model = "π₀.₅" if cfg.pi05 else "π₀"
    stored = horizon if horizon else "not stored (openpi: the model config)"
    sizes = (
        f"VLM {cfg.vlm.width}×{cfg.vlm.depth}, expert {cfg.expert.width}, action dim {cfg.action_dim}, horizon {stored}"
    )
    line = (
        f"exported {pi0.param_count(params):,} parameters ({model}: {sizes}) and the norm stats {asset_id!r} to "
        f"{out}; use it here with --pi0-checkpoint {out} --asset-id {asset_id}, in openpi as a TrainConfig's "
        f"checkpoint dir (weights: CheckpointWeightLoader('{out}/params'))"
    )
    if steering is not None:
        line += f"; and the noise policy that steers it ({NOISE_POLICY}.npz / .json: openpi serves π₀ alone)"
    if cfg.vocab_size != FULL_VOCAB or not cfg.cameras:
        cams = "no cameras" if not cfg.cameras else f"ViT {cfg.vit.width}×{cfg.vit.depth}"
        line += (
            f"; not the full-size model: openpi needs a model config with these sizes (vocab {cfg.vocab_size}, "
            f"{cams}, Gemma head dim {cfg.vlm.head_dim}, {cfg.vlm.num_heads} heads)"
        )
    return line


def noise_policy(src: str, run: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """A run's noise policy (the train state's "actor", a run of dsrl_pi0.py): its weights, flat names, and what
    serving it needs to know; None for a run without one."""
    if "noise_scale" not in run:
        return None
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(src, "checkpoints")) as mgr:
        state = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    about = {
        "input": "concat(π₀'s pooled prefix features, π₀'s normalised state), as dsrl_pi0.critic_obs",
        "output": "mean and log std (clipped to [-5, 2]) of a Gaussian over the flattened [action_horizon, action_dim]",
        "act": "w = noise_scale * tanh(mean) (deterministic) or of a sample; π₀'s noise is w on the first "
        "action_horizon steps of its chunk and 0 on the rest",
        "action_horizon": run["action_horizon"],
        "noise_scale": run["noise_scale"],
        "actor_hidden": list(run["actor_hidden"]),
        "layers": "Dense -> LayerNorm -> GELU per hidden width, then two Dense heads (flax names in the npz keys)",
    }
    return runlog._flatten(jax.device_get(state["actor"])), about


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
        main(tyro.cli(Args, prog="python -m common.openpi"))
