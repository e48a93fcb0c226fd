"""A training process killed with SIGKILL mid-run and resumed from its last checkpoint ends with exactly the weights
of an uninterrupted run (CPU, one thread, deterministic)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import resume_fit
import torch

KILL_AFTER = "epoch=1-step=8.ckpt"  # the end of epoch 2 of 6 (4 steps each)


@pytest.mark.slow
def test_sigkill_then_resume_from_last_checkpoint_equals_uninterrupted_run(tmp_path):
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, resume_fit.__file__, str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    try:
        while not (run / KILL_AFTER).exists():
            assert process.poll() is None, process.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # the newest checkpoint on disk (last.ckpt is written just after the epoch's own file, so it may lag one epoch)
    steps = {path: torch.load(path, weights_only=True)["global_step"] for path in run.glob("*.ckpt")}
    newest = max(steps, key=steps.get)
    assert 8 <= steps[newest] < 4 * resume_fit.EPOCHS  # killed mid-run, after step 8 was on disk

    resumed = resume_fit.fit(run, ckpt_path=newest).state_dict()
    reference = resume_fit.fit(tmp_path / "uninterrupted").state_dict()
    assert torch.load(tmp_path / "uninterrupted" / "last.ckpt", weights_only=True)["global_step"] == 24
    assert resumed.keys() == reference.keys() and any(".hyper." in k for k in reference)
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
