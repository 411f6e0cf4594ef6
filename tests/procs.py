"""Subprocesses for tests: free ports chosen at run time, and a timeout that kills the whole process tree.

A launcher (torchrun, accelerate) starts workers of its own; a plain ``subprocess.run(timeout=...)``
kills only the launcher and leaves a hung gloo worker behind, and torchrun starts its workers in sessions
of their own, so killing the launcher's session misses them too. Here every command's environment carries
a token that all its descendants inherit; on timeout every process holding the token is killed and the
test fails with what the ranks printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _marked(env: dict | None) -> tuple[dict, str]:
    """``env`` (default: this process's) with a token that every descendant inherits, even those that start a
    session of their own (torchrun's workers do) and outlive their parent."""
    token = uuid.uuid4().hex
    return {**(os.environ if env is None else env), "ICM_DIST_TEST_PROCS": token}, token


def _kill_marked(token: str) -> None:
    """SIGKILL every process whose environment holds ``token`` (Linux: read from /proc)."""
    needle = f"ICM_DIST_TEST_PROCS={token}".encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(d), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def run(cmd: list[str], *, timeout: float, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose timeout kills the process tree and
    fails with the tail of stdout and stderr instead of hanging or losing the output."""
    env, token = _marked(env)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=env, **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_marked(token)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout:.0f}s: {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def run_together(cmds: list[list[str]], *, timeout: float, envs: list[dict],
                 **kwargs) -> list[subprocess.CompletedProcess]:
    """Several commands at once (the agents of a multi-node launch), each with its own environment; on a timeout
    every process tree is killed and the test fails with what each printed."""
    marked = [_marked(e) for e in envs]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env=e, **kwargs) for c, (e, _) in zip(cmds, marked)]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for c, p in zip(cmds, procs):
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        tails = []
        for _, token in marked:
            _kill_marked(token)
        for c, p in zip(cmds, procs):
            out, err = p.communicate()
            tails.append(f"--- {' '.join(map(str, c))}\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}")
        raise AssertionError(f"timed out after {timeout:.0f}s\n" + "\n".join(tails)) from None
    return results
