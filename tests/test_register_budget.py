"""Every Triton kernel, compiled for Hopper (sm_90) with ptxas, fits the register budget without spilling.

No GPU is needed: ``tests/sm90_resources.py`` calls the kernel wrappers on small CPU tensors with launching
replaced by ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``, so each kernel is compiled with the block
sizes, num_warps and argument specialisations a launch at these widths would use, then reads ``ptxas -v``. It runs
in a subprocess because the rest of the suite sets ``TRITON_INTERPRET=1``, under which ``triton.jit`` makes
interpreter functions that cannot be compiled.

Budget: at most 128 registers per thread and no spills. An H100/H200 SM has 64K 32-bit registers; at 128 per
thread it holds 16 warps, i.e. two programs of 8 warps (four of 4), so one program's loads overlap another's
arithmetic and tail. These kernels are bandwidth-bound and need bytes in flight more than registers; above 128 an
8-warp program runs alone on its SM (the logits backward took 124-195 registers before it was retiled) and a spill
adds local-memory traffic to a kernel whose cost is memory traffic.

Widths: ``C = 1280`` and ``4096`` give the apply kernels' two channel blocks (256 and 512); the logits and Sinkhorn
kernels' tiles do not depend on ``C`` at these widths, nor does the merge backward's (one 128-byte line per token
and stream: its channels per thread and its split of the input streams depend on n and the dtype only). bf16
streams (the paper's set-up) at both, fp32 streams at 1280 (fp32 loads take twice the registers per element; the
merge backward spilled there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("triton")

STREAMS = (2, 4, 8)
CASES = (("bfloat16", 1280), ("bfloat16", 4096), ("float32", 1280))
MAX_REGISTERS = 128
REGISTERS_PER_SM = 65536
SCRIPT = Path(__file__).with_name("sm90_resources.py")


def _ptxas_or_skip() -> None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        pytest.skip(f"Triton's CUDA backend is not installed: {err}")
    try:
        path = get_ptxas(90).path
    except Exception as err:  # noqa: BLE001 - knobs raise various errors when the binary is missing
        pytest.skip(f"no ptxas for sm_90: {err}")
    if not path or not os.path.exists(path):
        pytest.skip(f"no ptxas for sm_90 at {path!r}")


@pytest.fixture(scope="module")
def resources() -> list[dict]:
    _ptxas_or_skip()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    by_dtype = defaultdict(list)
    for dtype, c in CASES:
        by_dtype[dtype].append(str(c))
    procs = [  # one process per dtype, side by side (compiling is single-threaded)
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--n", *map(str, STREAMS), "--c", *widths, "--dtype", dtype],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for dtype, widths in by_dtype.items()
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [r for r in rows if (r["dtype"], r["c"]) in CASES]


def _label(row: dict) -> str:
    return f"{row['kernel']} n={row['n']} C={row['c']} {row['dtype']} ({row['num_warps']} warps)"


def test_every_kernel_is_compiled_at_every_size(resources):
    script_kernels = _kernel_names()
    seen = defaultdict(set)
    for row in resources:
        seen[row["kernel"]].add((row["n"], row["dtype"], row["c"]))
    assert set(seen) == script_kernels
    wanted = {(n, dtype, c) for n in STREAMS for dtype, c in CASES}
    assert all(cases == wanted for cases in seen.values()), dict(seen)


def test_no_kernel_spills(resources):
    spilling = [f"{_label(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded" for r in resources]
    spilling = [s for s, r in zip(spilling, resources) if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(spilling)


def test_registers_within_budget(resources):
    over = [f"{_label(r)}: {r['registers']} registers" for r in resources if r["registers"] > MAX_REGISTERS]
    assert not over, "\n".join(over)
    for row in resources:
        per_thread = -(-row["registers"] // 8) * 8  # allocated in units of 8 per thread (256 per warp)
        assert REGISTERS_PER_SM // (per_thread * 32 * row["num_warps"]) >= 2, _label(row)


def _kernel_names() -> set[str]:
    """Every ``*_kernel`` JIT function of the kernel modules (read from source, without importing them here)."""
    root = Path(__file__).parents[1] / "lightning_mhc" / "kernels"
    names = set()
    for module in ("apply.py", "coefficients.py", "sinkhorn.py"):
        lines = (root / module).read_text().splitlines()
        for decorator, line in zip(lines, lines[1:]):
            if decorator.strip() == "@triton.jit" and line.startswith("def ") and "_kernel(" in line:
                names.add(line.removeprefix("def ").split("(")[0])
    return names
