"""Run a (multi-process) command from a test with a hard deadline: the test fails, it never hangs.

Why not ``subprocess.run(cmd, capture_output=True, timeout=T)``: on timeout it kills only the direct child,
then ``communicate()`` waits for EOF on the pipes, which grandchildren (torchrun's workers) still hold open,
so the test hangs anyway. And ``mp.spawn(join=True)`` has no deadline at all: one full run hung for 24 minutes
in test_ddp_two_processes_match_one_process (a gloo shutdown deadlock: rank 0's gloo thread blocked on a
mutex after rank 1 had exited).

So the command runs in its own session (= its own process group, which its children and grandchildren
inherit), writes to temporary files rather than pipes (nothing can block on a pipe), and at the deadline the
whole group is killed and the test fails with the command and the tail of its output. The group is killed in
a ``finally`` too, so a test interrupted (Ctrl-C, pytest-timeout's signal method) or whose command leaves
stray grandchildren behind leaves no orphans.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
import time

import pytest

TAIL = 4000  # characters of output shown when a command misses its deadline


def kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group led by ``p`` (started with ``start_new_session=True``; torchrun forwards the
    signal to its workers), give it ``grace`` seconds to go, then SIGKILL whatever is left, and reap ``p``.
    A no-op once the group is empty. ``p.pid`` is the group id: Linux does not reuse it while the group has
    members, so this cannot hit an unrelated process."""
    try:
        os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            p.poll()  # reap p: a zombie still counts as a member of the group
            os.killpg(p.pid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def _read(f) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")


def run_with_deadline(cmd, *, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Runs ``cmd`` (a list) to completion and returns a ``CompletedProcess`` with text ``stdout``/``stderr``;
    if it is still running after ``timeout`` seconds, kills its whole process group and fails the test."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env, cwd=cwd,
                             start_new_session=True)
        try:
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(p)
                tail = (_read(out) + "\n--- stderr ---\n" + _read(err))[-TAIL:]
                pytest.fail(f"deadline of {timeout:g} s passed, killed the process group of: "
                            f"{shlex.join(map(str, cmd))}\n--- output tail ---\n{tail}", pytrace=False)
        finally:
            kill_group(p, grace=1.0)  # stray grandchildren, or all of it if the wait was interrupted
        return subprocess.CompletedProcess(cmd, rc, _read(out), _read(err))
