"""Registers and spills of every Triton kernel compiled for Hopper (sm_90), without a GPU.

Run as a script (``python tests/sm90_resources.py [--n 2 4 8] [--c 4096] [--dtype bfloat16 float32]``) it prints
one JSON object per kernel launch: ``{"kernel", "n", "c", "dtype", "num_warps", "registers", "spill_stores",
"spill_loads", "stack"}``. It must run *without* ``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit``
makes no compilable functions), so tests start it in a subprocess.

How: the wrappers in ``lightning_mhc.kernels`` (``merge_forward``, ``logits_backward``, ...) are called on small
CPU tensors exactly as the autograd Functions call them, with ``JITFunction.run`` replaced by a function that does
what a launch does up to the compile (bind the arguments, specialise them, pack the signature, constexprs and
divisibility attributes with the CUDA backend) and then compiles for ``GPUTarget("cuda", 90, 32)`` instead of the
current device. So the kernels compiled are the ones a launch at these sizes would compile: same block sizes,
num_warps and specialisations (token counts and strides are multiples of 16 here, as in most training runs).
Register counts and spills come from ``ptxas -v`` run on the generated PTX with the flags Triton itself passes.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

TARGET = GPUTarget("cuda", 90, 32)
RESULTS: list[dict] = []
CONTEXT: dict = {}


def ptxas_path() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(TARGET.arch).path


def _ptxas_resources(ptx: str, enable_fp_fusion: bool) -> dict:
    """``ptxas -v`` with Triton's own flags (backends/nvidia/compiler.py ``make_cubin``)."""
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [ptxas_path(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src)]
        if not enable_fp_fusion:
            cmd.insert(2, "--fmad=false")
        log = subprocess.run([*cmd, "-o", str(Path(tmp) / "k.o")], check=True, capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "stack": int(stack.group(1)),
    }


def _compile_instead_of_launch(self: JITFunction, *args, grid, warmup, **kwargs):
    if CONTEXT.get("only") and not any(part in self.__name__ for part in CONTEXT["only"]):
        return
    backend = make_backend(TARGET)
    kwargs.setdefault("debug", False)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    row = {"kernel": self.__name__, **{k: v for k, v in CONTEXT.items() if k != "only"}}
    row["num_warps"] = kernel.metadata.num_warps
    row.update(_ptxas_resources(kernel.asm["ptx"], options.enable_fp_fusion))
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def compile_all(n: int, c: int, dtype: torch.dtype, tokens: int = 256) -> None:
    """Every kernel of ``lightning_mhc.kernels`` at ``n`` streams, width ``c``, stream dtype ``dtype``."""
    from lightning_mhc.kernels import apply, coefficients, sinkhorn

    CONTEXT.update(n=n, c=c, dtype=str(dtype).removeprefix("torch."))
    n_out = n * n + 2 * n
    x = torch.zeros(tokens, n, c, dtype=dtype)
    f = torch.zeros(tokens, c, dtype=dtype)
    h = torch.zeros(tokens, n)
    h_res = torch.zeros(tokens, n, n)
    phi, alpha, bias = torch.zeros(n * c, n_out), torch.ones(3), torch.zeros(n_out)
    flat = x.reshape(tokens, n * c)
    _, mr, r = coefficients.logits_forward(flat, phi, alpha, bias, n, True)
    coefficients.logits_backward(flat, phi, alpha, torch.zeros(tokens, n_out), mr, r, n)
    sinkhorn.sinkhorn_forward(h_res, 20)
    sinkhorn.sinkhorn_backward(h_res, h_res, 20)
    apply.pre_mix_forward(x, h)
    apply.pre_mix_backward(x, h, f)
    apply.merge_forward(x, f, h_res, h)
    apply.merge_backward(x, f, h_res, h, x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--c", type=int, nargs="+", default=[4096])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"])
    parser.add_argument("--only", nargs="*", default=[], help="kernels whose name contains one of these")
    args = parser.parse_args(argv)
    CONTEXT["only"] = args.only
    JITFunction.run = _compile_instead_of_launch
    for dtype in args.dtype:
        for c in args.c:
            for n in args.n:
                compile_all(n, c, getattr(torch, dtype))


if __name__ == "__main__":
    if __import__("os").environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter makes no compilable kernels")
    main()
