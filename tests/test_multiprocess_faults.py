"""Multi-process runs end by themselves when something goes wrong (issue 17, "Reliability").

- Under torchrun (2 gloo processes, CPU), a rank that dies mid-training makes the run exit with an error that
  names the failed rank, within a deadline, instead of leaving the other rank waiting in a collective.
- tests/_proc.py's ``run_with_deadline``, which every multi-process test goes through: at the deadline it kills
  the whole process group, grandchildren included (even one that ignores SIGTERM), and fails the test.
"""
from __future__ import annotations

import os
import re
import sys
import textwrap
import time

import pytest

from _proc import run_with_deadline

# Rank 1 dies at step 2 (no exception, no cleanup: as if OOM-killed); rank 0 is then in, or about to enter,
# an all-reduce with a peer that is gone. The 30 s process-group timeout bounds that wait even without torchrun.
FAULT_SCRIPT = textwrap.dedent("""
    import datetime, os
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(10):
        if rank == 1 and step == 2:
            os._exit(3)
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()  # DDP all-reduces the gradients
        opt.step()
        t = torch.ones(1)
        dist.all_reduce(t)
        print(f"rank {rank} step {step}", flush=True)
    print(f"rank {rank} finished all steps", flush=True)
    dist.destroy_process_group()
""")


def test_dead_rank_ends_the_run_with_an_error(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    r = run_with_deadline([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=env, timeout=120)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-4000:]
    assert "rank 1 step 1" in out and "rank 1 step 2" not in out, out[-4000:]  # it died where it should
    assert "finished all steps" not in out, out[-4000:]
    # torchrun's failure summary names the rank and its exit code ("rank      : 1 (local_rank: 1)", "exitcode  : 3")
    assert re.search(r"rank\s*:\s*1\b", out) and re.search(r"exitcode\s*:\s*3\b", out), out[-4000:]
    print(f"\ntorchrun with a dead rank exited with {r.returncode} after {took:.1f} s")


# The child starts a grandchild that ignores SIGTERM (so only the SIGKILL of the group ends it), writes its
# pid to a file, then both sleep far past the deadline. -S: no site import, a fast start.
SPAWNER = textwrap.dedent("""
    import subprocess, sys
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"
    p = subprocess.Popen([sys.executable, "-S", "-c", code])
    with open(sys.argv[1], "w") as f:
        f.write(str(p.pid))
    print("spawned", p.pid, flush=True)
    p.wait()
""")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its new parent to reap it counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal-0 probe
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def test_run_with_deadline_kills_the_grandchildren(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as e:
        run_with_deadline([sys.executable, "-S", "-c", SPAWNER, str(pid_file)], timeout=3)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert "deadline of 3 s passed" in msg and "spawned" in msg, msg  # says the deadline and the output tail
    pid = int(pid_file.read_text())
    end = time.monotonic() + 10  # its new parent (init or a subreaper) may take a moment to reap it
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(pid), f"grandchild {pid} survived the deadline"
    assert took < 3 + 5 + 5, took  # deadline + SIGTERM grace + slack


def test_run_with_deadline_cleans_up_after_a_normal_exit(tmp_path):
    # the child exits at once with 0 but leaves its grandchild running: the result comes back at once (no pipe
    # for the grandchild to hold open) and the grandchild is killed with the group
    pid_file = tmp_path / "grandchild.pid"
    spawner = SPAWNER.replace("p.wait()", "sys.exit(0)")
    t0 = time.monotonic()
    r = run_with_deadline([sys.executable, "-S", "-c", spawner, str(pid_file)], timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("spawned"), r
    pid = int(pid_file.read_text())
    end = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(pid), f"grandchild {pid} survived its parent's exit"
    assert time.monotonic() - t0 < 30
