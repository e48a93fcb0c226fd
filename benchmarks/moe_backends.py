"""Forward + backward time of one MoE feed-forward layer: the torch backend against MegaBlocks' dMoE, on CUDA.

Both layers hold the same weights (the torch backend keeps MegaBlocks' parameter names and shapes); bf16, timed
with ``triton.testing.do_bench``. Without MegaBlocks only the torch backend is timed, and the table says why.

    python benchmarks/moe_backends.py                      # DeepSeek-V3-like routing at a small width
    python benchmarks/moe_backends.py --hidden 2048 --experts 64 --top-k 6
"""

from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench

from lightning_mhc.moe import MoEConfig, build_moe, megablocks_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=512, help="hidden size of each routed expert")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()
    cfg = MoEConfig(
        hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=args.top_k, mlp_type="glu"
    )
    backends = ["torch"] + (["megablocks"] if megablocks_available() else [])
    layers = {b: build_moe(cfg, backend=b, device="cuda", dtype=torch.bfloat16) for b in backends}
    for layer in layers.values():
        layer.load_state_dict(layers[backends[-1]].state_dict())
    x = torch.randn(8, args.tokens // 8, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(x)

    def step(layer: torch.nn.Module) -> None:
        layer(x).backward(grad)

    print(f"## MoE layer, {torch.cuda.get_device_name()}, bf16: {args.tokens} tokens, h={args.hidden}, ", end="")
    print(f"{args.experts} experts (f={args.ffn}, SwiGLU), top-{args.top_k}\n")
    print("| backend | fwd+bwd ms | x torch |\n|---|---:|---:|")
    times = {b: do_bench(lambda layer=layer: step(layer)) for b, layer in layers.items()}
    for b, ms in times.items():
        print(f"| {b} | {ms:.3f} | {times['torch'] / ms:.2f} |")
    if "megablocks" not in layers:
        print("\nMegaBlocks is not available here (see lightning_mhc.moe.MEGABLOCKS_INSTALL_HINT).")


if __name__ == "__main__":
    main()
