"""Where one FP8 scale per operand loses accuracy on bench_w4's synthetic layers (CPU).

    python bench/diag_one_scale_accuracy.py [--k 3072] [--n 3072] [--rows 1024] [--fmt int4]

The layer and its activations are built as ``bench_w4.accuracy`` builds them (seed 0).  Printed:

1. the large-M reference (``reference_prefill.w4_linear_prefill``) with each scaling, and
   each operand's scaling swapped on its own (activations row / tensor x weights row / tensor),
   relative error against the float64 layer;
2. the activation codes' own error, ``|xq * scale - x * smooth_inv| / |x * smooth_inv|``, with the
   row scales, the one scale, the row scales times a random factor in [1, 2) per token, and the
   row scales times 2: which property of the row scales keeps their error low;
3. the branch factors' bound against the largest ``|x @ l1|`` the batch gives, and the fraction
   of the residual's weight codes that are FP8 subnormals with each scaling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.svdquant import SVDQuantConfig, SVDQuantLinear  # noqa: E402
from bench.bench_w4 import synth_activations  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=3072)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--fmt", default="int4", choices=["int4", "fp4"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(args.k, args.n)
    with torch.no_grad():  # as bench_w4.accuracy: a few strong input directions
        lin.weight.mul_(1 + 4 * (torch.rand(args.k, generator=gen) < 0.01).float())
    calib = synth_activations(512, args.k, gen)
    x = synth_activations(args.rows, args.k, gen).to(torch.bfloat16).float()
    truth = x.double() @ lin.weight.double().t() + lin.bias.double()
    q = SVDQuantLinear.from_linear(lin, calib, config=SVDQuantConfig(rank=32, fmt=args.fmt))
    q.rebuild_branch()
    fmt, st = args.fmt, q.strength
    print(f"{args.k}x{args.n} {fmt}, {args.rows} tokens, rank {q.l1.shape[1]}")

    scales = {
        s: rp.prefill_scales(q.l1, q.l2, q.smooth_inv, q.wscale, fmt, st, scaling=s) for s in rp.SCALINGS
    }
    g = scales["row"][0]  # the same factors for both scalings
    for xs in rp.SCALINGS:
        xq, sx = rp.quantize_act_rowwise(x, q.smooth_inv, q.l1, st, 1, g, xs)
        for ws in rp.SCALINGS:
            cs = scales[ws][1]
            wq = rp.expand_weight(q.qweight, q.wscale, fmt, q.l2, g, cs)
            out = (xq.float() * sx) @ (wq.float() * cs[:, None]).t() + q.bias.float()
            print(f"  activations {xs:6s} x weights {ws:6s}: layer error {_rel(out, truth):.4f}")

    xs_true = x * q.smooth_inv
    peak = xs_true.abs().amax(1, keepdim=True)
    factor = 1 + torch.rand(peak.shape, generator=torch.Generator().manual_seed(1))
    for name, scale in (
        ("row scales", peak / 448),
        ("one scale", (peak.max() / 448).expand_as(peak)),
        ("row scales x U[1,2) per token", peak / 448 * factor),
        ("row scales x 2", peak / 448 * 2),
    ):
        codes = (xs_true / scale).to(torch.float8_e4m3fn).float()
        print(f"  activation codes' error, {name}: {_rel(codes * scale, xs_true):.4f}")

    la_peak = (x @ q.l1.float()).abs().amax(0)
    loose = rp.branch_bound(q.l1, q.smooth_inv) * peak.max() / la_peak  # the bound on |x @ l1| / its peak
    print(f"  bound on |x @ l1| / its largest value: {loose.min():.0f}x to {loose.max():.0f}x")
    for ws in rp.SCALINGS:
        wq = rp.expand_weight(q.qweight, q.wscale, fmt, q.l2, g, scales[ws][1])[
            :, : q.qweight.shape[0] * 64
        ].float()
        nonzero = wq != 0
        sub = ((wq.abs() < 2**-6) & nonzero).sum().item() / max(nonzero.sum().item(), 1)
        print(f"  residual weight codes that are FP8 subnormals, {ws} scales: {sub:.4f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
