"""When one DDP rank raises, every rank exits with an error within a bounded time, no hang (2 gloo processes)."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_fit.py")
BOUND_S = 150  # each run takes ~20 s on 2 idle cores; a hang would wait for gloo's 30-minute timeout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_rank_failing_stops_every_rank(tmp_path):
    """Rank 0 (the launcher, whose death Lightning's child-process observer cannot report) fails alone, once in
    MHCCallback's probe at setup and once in a training step; both runs start together to halve the wall time.

    After the probe, the ranks agree on success: rank 1 raises MHCCallback's error naming rank 0, rather than going on
    to DDP's weight broadcast and waiting there for a rank that is gone (which only gloo notices, NCCL does not).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for where in ("probe", "step"):
        out = tmp_path / where
        out.mkdir()
        command = [sys.executable, str(SCRIPT), str(out), "fail", where, "0"]
        runs[where] = subprocess.Popen(
            command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
    start = time.monotonic()
    logs = {}
    try:
        for where, process in runs.items():
            logs[where] = process.communicate(timeout=max(1.0, BOUND_S - (time.monotonic() - start)))[0].decode()
    finally:
        for process in runs.values():  # a hung run fails the test instead of blocking CI: end both its ranks
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    for where, log in logs.items():
        assert runs[where].returncode != 0, log[-3000:]
        assert f"[rank0]: RuntimeError: fault injected on rank 0 in the {where}" in log, log[-3000:]
        assert not (tmp_path / where / "rank0.pt").exists() and not (tmp_path / where / "rank1.pt").exists()
    assert (
        "[rank1]: RuntimeError: MHCCallback's injection (its probe forward at setup) failed on rank(s) [0]"
        in (logs["probe"])
    ), logs["probe"][-3000:]
    assert "[rank1]: RuntimeError:" in logs["step"], logs["step"][-3000:]  # gloo: "Connection closed by peer"
