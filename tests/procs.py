"""Subprocesses for tests: free ports chosen at run time, and a timeout that kills the whole process tree.

A launcher (torchrun, accelerate) starts workers of its own; a plain ``subprocess.run(timeout=...)``
kills only the launcher and leaves a hung gloo worker behind. Here every command runs in its own
session, and on timeout the whole session is killed and the test fails with what the ranks printed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose timeout kills the process tree and
    fails with the tail of stdout and stderr instead of hanging or losing the output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout:.0f}s: {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
