"""A run folder has one owner and can be written: a second process on a folder in use (a --resume of a running run, a
new run in a folder just taken) is refused with one line naming the first and leaves the folder as it was; the lock
goes with its process (kill -9 included); a --run-dir that is a file or cannot be written, and an --exp-name that is
a path, are refused before any work."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from tiny import ACRLPD, snapshot

import acrlpd_pi0 as ac
from common import RunError, runlog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
HOLD = (  # takes the folder's lock as a run does, says so, and keeps it
    "import sys, time\n"
    "from common import runlog\n"
    "fd = runlog.lock_folder(sys.argv[1], 'acrlpd_pi0', '--run-dir ' + sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


@dataclasses.dataclass
class Args(runlog.RunArgs):
    exp_name: str = "test"


@pytest.fixture
def hold():
    """hold(folder): a process that holds `folder`'s lock until the test ends (or kills it)."""
    procs = []

    def start(folder: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, folder], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held", proc.wait()
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def run_folder(path) -> str:
    """A folder as a tiny acrlpd_pi0 run leaves it (args.json, metrics, a checkpoint and host file: their bytes)."""
    os.makedirs(path / "checkpoints" / "4")
    os.makedirs(path / "host")
    args = {**dataclasses.asdict(ac.Args(**ACRLPD)), "_script": "acrlpd_pi0"}
    (path / "args.json").write_text(json.dumps(args, indent=2, default=str))
    (path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "losses/bc": 1.0 / s}) + "\n" for s in (4, 8)))
    (path / "checkpoints" / "4" / "state").write_bytes(os.urandom(256))
    (path / "host" / "4.p0.npz").write_bytes(os.urandom(128))
    return str(path)


def cli(script: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, f"{script}.py", *flags], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def one_line(proc: subprocess.Popen) -> str:
    """The one line a refused script printed on stderr (exit status 2, no traceback)."""
    out, err = (s.decode() for s in proc.communicate(timeout=120))
    assert proc.returncode == 2 and "Traceback" not in err + out, (proc.returncode, err[-3000:])
    (line,) = err.strip().splitlines()
    return line


def test_a_second_process_on_a_run_folder_is_refused(tmp_path, hold):
    """`--resume --run-dir R` while another process runs in R: exit 2 before any work, one line naming that process,
    every file of R as it was."""
    folder = run_folder(tmp_path / "run")
    holder = hold(folder)
    before = snapshot(folder)
    line = one_line(cli("acrlpd_pi0", "--resume", "--run-dir", folder))
    assert line.startswith(f"error: --run-dir {folder} is in use by pid {holder.pid} on host "), line
    assert "(acrlpd_pi0.py, started " in line and line.endswith("wait for it to end, or pick another folder"), line
    assert snapshot(folder) == before


def test_the_lock_is_taken_before_anything_is_written(tmp_path, hold):
    """Two processes past the early check at once: the one that comes second to `Run` is refused there, the folder
    untouched; a new run in a folder another process just created and locked is refused the same way."""
    folder = run_folder(tmp_path / "run")
    holder = hold(folder)
    before = snapshot(folder)
    with pytest.raises(RunError, match=f"--run-dir {folder} is in use by pid {holder.pid} on host"):
        runlog.Run(Args(run_dir=folder, resume=True), "acrlpd_pi0")
    assert snapshot(folder) == before
    fresh = str(tmp_path / "fresh")
    os.mkdir(fresh)
    other = hold(fresh)  # the folder holds nothing but its lock
    with pytest.raises(RunError, match=f"--run-dir {fresh} is in use by pid {other.pid}"):
        Args(run_dir=fresh).check_run()
    with pytest.raises(RunError, match=f"--run-dir {fresh} is in use by pid {other.pid}"):
        runlog.Run(Args(run_dir=fresh), "script")
    assert os.listdir(fresh) == [runlog.LOCK_FILE]
    run = runlog.Run(Args(run_dir=str(tmp_path / "mine")), "script")  # in one process too: one Run per folder
    with pytest.raises(RunError, match=f"is in use by pid {os.getpid()}"):
        Args(run_dir=run.dir, resume=True).check_run()
    run.close()  # released
    assert runlog.holder(run.dir) is None
    runlog.Run(Args(run_dir=run.dir, resume=True), "script").close()


def test_the_lock_goes_with_its_process(tmp_path, hold):
    """kill -9 of the process that holds a folder: the OS releases its lock, a new run takes the folder."""
    folder = str(tmp_path / "run")
    os.mkdir(folder)
    proc = hold(folder)
    assert runlog.holder(folder).startswith(f"pid {proc.pid} on host ")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert runlog.holder(folder) is None
    run = runlog.Run(Args(run_dir=folder), "script")
    assert json.load(open(os.path.join(folder, runlog.LOCK_FILE)))["pid"] == os.getpid()
    run.close()


def test_a_run_folder_that_cannot_be_written_is_refused(tmp_path):
    """--run-dir a file, --run-dir in a folder that cannot be written, --exp-name a path: exit 2, one line, before any
    work; the file as it was, nothing created."""
    as_file = tmp_path / "weights.bin"
    as_file.write_bytes(b"not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    parent = str(ro) if runlog._unwritable(str(ro)) else "/sys"  # root writes in a 0o555 folder, not in /sys
    if not runlog._unwritable(parent):
        ro.chmod(0o755)
        pytest.skip("no folder here that this user cannot write")
    try:
        procs = [
            cli("chunk_awr", "--run-dir", str(as_file)),
            cli("flow_ppo", "--run-dir", f"{parent}/run"),
            cli("acrlpd_pi0", "--exp-name", "../../x"),
        ]
        lines = [one_line(p) for p in procs]
    finally:
        ro.chmod(0o755)
    assert lines[0] == f"error: --run-dir {as_file} is a file, not a folder: pick a folder (new, or empty)"
    assert lines[1].startswith(f"error: --run-dir {parent}/run: cannot write in {parent} ("), lines[1]
    assert lines[1].endswith("): pick a writable folder") and "permission denied" in lines[1], lines[1]
    assert lines[2].startswith("error: --exp-name ../../x: a name, not a path"), lines[2]
    assert as_file.read_bytes() == b"not a folder" and os.listdir(ro) == []
    with pytest.raises(RunError, match=f"--run-dir {as_file}/run: {as_file} is a file, not a folder: pick a writable"):
        Args(run_dir=f"{as_file}/run").check_run()


def test_a_read_only_file_system_is_refused(tmp_path):
    """The default run folder runs/<...> on a read-only file system (a read-only bind mount of the current folder,
    in a mount namespace of its own): one line before any work. Skipped where mount namespaces are not allowed."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro}"
    allowed = shutil.which("unshare") and not subprocess.run(["unshare", "-m", "sh", "-c", mount]).returncode
    if not allowed:
        pytest.skip("no mount namespace here (unshare -m)")
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f'{mount} && cd {ro} && exec "$0" {ROOT}/chunk_awr.py', sys.executable],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    line = one_line(proc)
    assert line == (
        f"error: the run folder runs/<env>__<name>__<seed>__<time>: cannot write in {ro} (read-only file system): "
        "pass --run-dir in a writable folder"
    ), line
    assert os.listdir(ro) == []
