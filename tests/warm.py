"""Run an entry point (``python launch/train.py ...``, ``python -m icm_dist.commands.cli ...``) in a process of
its own that skips the interpreter's start-up: it forks from a server that imported torch and icm_dist once.

A test of a refusal runs dozens of commands whose own work takes a fraction of a second beside the seconds
it takes a fresh interpreter to import torch. The forked process runs the same script with the same
arguments, environment and working directory, its stdout and stderr are its own and its exit code is the
script's; only the imports are shared. The server is started fresh (``forkserver``), so it never ran a
thread pool that a fork could break. What this cannot see is output of the imports themselves, so a test
that uses it keeps one cold start of the same entry point beside it (``tests/test_bad_inputs.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "icm_dist.commands.cli", "torch.distributed.elastic.multiprocessing.errors"]
_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def _entry(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    """In the forked process: become ``argv`` run from ``cwd`` with ``env``, writing to ``out`` and ``err``."""
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        sys.path[:0] = [cwd, *extra]
        sys.modules.pop(argv[2], None)  # as under python -m: the module runs as __main__, not as its imported copy
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        sys.path[:0] = [str(Path(argv[1]).resolve().parent), *extra]
        runpy.run_path(argv[1], run_name="__main__")


def run_warm(argv: list[str], *, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``argv`` (``[python, script, ...]`` or ``[python, -m, module, ...]``) as :func:`procs.run` would run it,
    from the warm server: returns its exit code, stdout and stderr."""
    if argv[0] != sys.executable:
        raise ValueError(f"run_warm runs this interpreter's scripts, not {argv[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        p = _context().Process(target=_entry, args=(list(argv), dict(env), str(cwd), out, err))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"timed out after {timeout:.0f}s: {' '.join(map(str, argv))}\n"
                                 f"--- stderr ---\n{Path(err).read_text()[-6000:]}")
        return subprocess.CompletedProcess(argv, p.exitcode, Path(out).read_text(), Path(err).read_text())
