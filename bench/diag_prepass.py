"""Diagnose pre-pass configs (BLOCK_M=64 lost a K group on H100 / Triton 3.6): prints the error per config."""

import torch

from studio.kernels import reference as ref
from studio.kernels.quant_act import quantize_act_triton

for m, k, r in [(1029, 448, 160), (4608, 3072, 96)]:
    x = torch.randn(m, k, device="cuda").bfloat16()
    sinv = torch.rand(k, device="cuda") + 0.5
    l1 = (torch.randn(k, r, device="cuda") * 0.05).bfloat16()
    st = torch.rand(3, r, device="cuda")
    want = ref.quantize_act(x, sinv, l1, st, 100)[2]
    for bm, w, s in [(16, 4, 3), (32, 4, 3), (64, 4, 1), (64, 4, 3), (64, 8, 4)]:
        la = quantize_act_triton(x, sinv, l1, st, 100, config=dict(BLOCK_M=bm, num_warps=w, num_stages=s))[2]
        print(m, k, r, (bm, w, s), f"{((la - want).norm() / want.norm()).item():.2e}")
