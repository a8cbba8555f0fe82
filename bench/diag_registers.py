"""Registers per thread of the small-M kernel, per config, compiled for sm_90 on the CPU.

    python bench/diag_registers.py [--k 3072] [--n 3072] [--rank 32]

No GPU needed (``studio/kernels/hopper_compile.py``).  For each autotuning config, at
M = 16 and 64, INT4 (with the launcher's defaults: ``use_magic``, ``use_swap``...) and both ways of
finishing: the registers per thread, the blocks per SM those registers allow (65,536
registers per SM, allocated per warp in steps of 256) and the stack frame (where ptxas puts
spilled registers).  A streaming kernel with few warps per SM keeps few weight bytes in
flight, which is what bounds the small-M path.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.kernels import reference as ref  # noqa: E402
from studio.kernels.hopper_compile import caught_launches, compile_for_hopper, resource_usage  # noqa: E402
from studio.kernels.small_m_triton import _split_configs, w4_linear_small_m_triton  # noqa: E402


def blocks_per_sm(regs: int, warps: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    return min(65536 // (per_warp * warps), 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    k, n, r = args.k, args.n, args.rank
    qw, ws = ref.quantize_weight(torch.randn(n, k), "int4")
    l1, l2 = torch.randn(k, r).bfloat16(), torch.randn(n, r).bfloat16()
    for m in (16, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        call = (x, torch.ones(k), qw, ws, "int4", l1, l2, torch.ones(1, r), m, torch.randn(n))
        for finish in ("last", "epilogue"):
            for cfg in _split_configs():
                kw = cfg.all_kwargs()
                launches = caught_launches(partial(w4_linear_small_m_triton, *call, config=kw, finish=finish))
                fn, a, launch_kw = launches[0]  # the split-K kernel (the epilogue kernel comes second)
                usage = resource_usage(compile_for_hopper(fn, a, launch_kw))
                regs = usage["REG"]
                tile = f"BLOCK_N {kw['BLOCK_N']:3d} SPLIT_K {kw['SPLIT_K']:2d} warps {kw['num_warps']}"
                print(
                    f"M={m:2d} finish={finish:8s} {tile}: {regs:3d} registers/thread, "
                    f"{blocks_per_sm(regs, kw['num_warps'])} blocks "
                    f"({blocks_per_sm(regs, kw['num_warps']) * kw['num_warps']} warps) per SM, "
                    f"stack {usage.get('STACK', 0)} bytes/thread (register spills)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
