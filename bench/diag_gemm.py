# ruff: noqa: B023  (each closure is timed before its loop variables change)
"""Where does the 4-bit GEMM's time go at large M?  Times the GEMM with and without the
per-group accumulator rescale (the latter computes wrong numbers: a probe only) and
counts tensor-core instructions in the PTX."""

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_w4 import bench, make_w4  # noqa: E402

from studio import kernels  # noqa: E402
from studio.kernels.gemm_w4_triton import _w4_gemm_kernel, gemm_w4_triton  # noqa: E402

for k, n in [(3072, 3072), (12288, 3072)]:
    m = 4608
    p = make_w4(k, n, 32, "fp4", "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs, la = kernels.quantize_act(x, p["smooth_inv"], p["l1"], p["strength"], 1)
    for rescale in (True, False):
        for cfg in [
            dict(BLOCK_N=128, BLOCK_M=128, SPLIT_K=1, num_warps=8, num_stages=3),
            dict(BLOCK_N=128, BLOCK_M=256, SPLIT_K=1, num_warps=8, num_stages=3),
            dict(BLOCK_N=256, BLOCK_M=128, SPLIT_K=1, num_warps=8, num_stages=3),
        ]:

            def fn():
                return gemm_w4_triton(
                    xq,
                    xs,
                    p["qweight"],
                    p["wscale"],
                    "fp4",
                    la,
                    p["l2"],
                    None,
                    config=cfg,
                    group_rescale=rescale,
                )

            t = bench(fn)
            print(
                f"K={k} N={n} M={m} rescale={rescale} {cfg['BLOCK_N']}x{cfg['BLOCK_M']}: {t:.1f} us "
                f"{2 * m * n * k / t / 1e6:.0f} TFLOP/s",
                flush=True,
            )
try:
    compiled = list(_w4_gemm_kernel.fn.device_caches[0][0].values())
except Exception as err:  # noqa: BLE001 - Triton internals differ between versions
    print("no compiled-kernel cache:", err)
    compiled = []
for kern in compiled[:6]:
    ptx = kern.asm.get("ptx", "")
    print(
        "ptx wgmma:",
        len(re.findall(r"wgmma.mma_async", ptx)),
        "mma.sync:",
        len(re.findall(r"mma.sync", ptx)),
        "wait_group:",
        len(re.findall(r"wgmma.wait_group", ptx)),
        "shared reg spill:",
        kern.n_spills,
        kern.n_regs,
    )
