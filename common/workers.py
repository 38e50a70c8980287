"""Worker processes for environments that live outside the training process (gymnasium, LIBERO).

A `Pool` holds objects built from a factory ("module:name", called with keyword arguments), each in a fresh
`python -m common.workers` process (no JAX, no copy of the script) that runs the object's methods by name, talking
pickles over its stdin/stdout; with `processes=False` the objects live in this process behind the same interface.
A call goes to several workers before any reply is awaited, so they step in parallel. A worker has a session of its
own (Ctrl-C and SIGTERM reach the script alone, which saves and exits) and exits when its pipe closes, however the
script ended. An exception in a worker is raised here as a one-line `WorkerError`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import RunError


class WorkerError(RunError):
    """An exception a worker's object raised: its type's name (`kind`) and message."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


def _build(factory: str, kwargs: dict[str, Any]) -> Any:
    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


class _Process:
    """One worker process and its pipe."""

    def __init__(self, factory: str, kwargs: dict[str, Any], what: str, quiet: bool):
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding the `common` package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "common.workers", *(["quiet"] if quiet else [])]
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.proc = subprocess.Popen(cmd, **pipes, env=env, cwd=root, start_new_session=True)
        self.what = what
        self.send(factory, kwargs)

    def send(self, method: str, *args: Any) -> None:
        try:
            pickle.dump((method, args), self.proc.stdin)
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died()

    def _died(self) -> None:
        code = self.proc.wait()
        raise RunError(f"a {self.what} worker process died (exit code {code}); see its stderr above") from None

    def recv(self) -> Any:
        try:
            status, reply = pickle.load(self.proc.stdout)
        except EOFError:
            self._died()
        if status == "error":
            raise WorkerError(*reply)
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("close")
                self.proc.wait(timeout=10)
            except (OSError, RunError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class _Local:
    """`_Process`'s interface on an object in this process."""

    def __init__(self, factory: str, kwargs: dict[str, Any], what: str, quiet: bool):
        self.obj = None
        try:
            self.obj = _build(factory, kwargs)
            self.reply = ("ok", getattr(self.obj, "info", None))
        except Exception as e:  # noqa: BLE001  (raised by `recv`, as a worker's would be)
            self.reply = ("error", e)

    def send(self, method: str, *args: Any) -> None:
        try:
            self.reply = ("ok", getattr(self.obj, method)(*args))
        except Exception as e:  # noqa: BLE001
            self.reply = ("error", e)

    def recv(self) -> Any:
        status, reply = self.reply
        if status == "error":
            raise WorkerError(type(reply).__name__, str(reply)) from reply
        return reply

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()


class Pool:
    """Objects built by `factory` (their `close` called at the end), in worker processes or in this one. `what` names
    them in errors; `quiet` discards what they print (else it goes to stderr)."""

    def __init__(self, factory: str, what: str, processes: bool = True, quiet: bool = False):
        self.factory, self.what, self.processes, self.quiet = factory, what, processes, quiet
        self.workers: list[_Process | _Local] = []

    def start(self, kwargs: list[dict[str, Any]]) -> list[Any]:
        """One more worker per entry of `kwargs`, its object built with them; returns each object's `info` (or None)
        once all are built."""
        new = [(_Process if self.processes else _Local)(self.factory, kw, self.what, self.quiet) for kw in kwargs]
        self.workers += new
        return [w.recv() for w in new]

    def call(self, method: str, jobs: dict[int, tuple]) -> dict[int, Any]:
        """`method(*args)` on worker w's object for every w, args in `jobs`, all sent before any reply is awaited."""
        for w, args in jobs.items():
            self.workers[w].send(method, *args)
        return {w: self.workers[w].recv() for w in jobs}

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []


def _serve(quiet: bool) -> None:
    """A worker's loop: build the object, then answer calls until "close" or the end of the pipe."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY) if quiet else 2, 1)  # what the object prints stays out of the pickles
    obj = None
    while True:
        try:
            method, args = pickle.load(sys.stdin.buffer)
        except EOFError:  # the parent is gone
            break
        if method == "close":
            break
        try:
            if obj is None:
                obj = _build(method, *args)
                reply = getattr(obj, "info", None)
            else:
                reply = getattr(obj, method)(*args)
            pickle.dump(("ok", reply), out)
        except Exception as e:  # noqa: BLE001  (sent to the parent, which raises it there)
            pickle.dump(("error", (type(e).__name__, str(e))), out)
        out.flush()
    if obj is not None:
        obj.close()


if __name__ == "__main__":
    _serve(quiet=sys.argv[1:] == ["quiet"])
