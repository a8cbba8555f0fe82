# ruff: noqa: B023  (closures are timed before the loop variables change)
"""The large-M weight expansion (4-bit codes -> FP8) in other loop forms (GPU diagnostic).

    python bench/diag_expand_weight.py [--shapes 3072x3072,3072x12288,12288x3072] [--rank 32]

``prefill_triton._expand_weight_kernel`` unpacks one group of 64 codes per loop step: a
``[BLOCK_N, 32]`` byte load, two ``[BLOCK_N, 32]`` FP8 stores.  It took 12.2 us on 3072x3072
and 28.5-28.9 us on the two large shapes (twenty-second session), about twice what its bytes
need at the bandwidth the same timing gives an FP8 cast of X.  Timed here after a 64 MB
memset (``bench_w4.bench``), every variant at several tiles, its output checked bit for bit
against the kernel's (``joined`` is the kernel's form since the twenty-third session):

- ``loop``: the kernel's loop until the twenty-third session (a copy; it is the reference the
  others are checked against only through the kernel, which now takes the ``joined`` form);
- ``unrolled``: the same steps unrolled (``tl.static_range``), so that the loads of all
  ``GROUPS`` groups can be in flight together;
- ``tile3d``: one ``[BLOCK_N, GROUPS, 32]`` load and two 3-D stores per program;
- ``joined``: one load, the two nibble halves joined into ``[BLOCK_N, GROUPS * 64]`` rows and
  written in one store (whole rows of ``GROUPS * 64`` bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, make_w4  # noqa: E402
from studio.kernels import reference_prefill as rp  # noqa: E402
from studio.kernels.prefill_triton import (  # noqa: E402
    _FP8_MAX,
    _branch_factors,
    _decode,
    _expand_weight_kernel,
    _split_e4m3,
    expand_weight_triton,
)

VARIANTS = ("loop", "unrolled", "tile3d", "joined")


@triton.jit
def _expand_probe(
    q_ptr, ws_ptr, wmax_ptr, l2_ptr, bound_ptr, str_ptr, out_ptr, cs_ptr, g_ptr,
    N, KG, KP, KT, R, RB, S,
    stride_qg, stride_qn, stride_wsg, stride_l2n, stride_sm, stride_on,
    FP4: tl.constexpr, S_PAD: tl.constexpr, R_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """``_expand_weight_kernel`` with one scale per operand and the codes loop in ``VARIANT`` form."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    n_mask = offs_n < N
    r_mask = offs_r < R
    g = _branch_factors(bound_ptr, str_ptr, R, S, stride_sm, S_PAD, R_PAD)
    l2 = tl.load(
        l2_ptr + offs_n[:, None] * stride_l2n + offs_r[None, :], n_mask[:, None] & r_mask[None, :], 0.0
    ).to(tl.float32)
    l2_peak = tl.load(wmax_ptr + 1 + offs_r, r_mask, 0.0)
    peak = tl.maximum(tl.load(wmax_ptr), tl.max(l2_peak * g, axis=0))
    cs = tl.zeros([BLOCK_N], dtype=tl.float32) + tl.maximum(peak / _FP8_MAX, 1e-30)
    inv = 1.0 / cs
    if pid_k == tl.cdiv(KG, GROUPS):  # the last column: branch blocks, zero tail and scales only
        hi, lo = _split_e4m3(l2 * g[None, :] * inv[:, None])
        dst = out_ptr + offs_n[:, None] * stride_on + KP + offs_r[None, :]
        mask = n_mask[:, None] & (offs_r < RB)[None, :]
        tl.store(dst, hi, mask)
        tl.store(dst + RB, lo, mask)
        tl.store(dst + 2 * RB, hi, mask)
        tail = KT - KP - 3 * RB
        offs_t = tl.arange(0, TAIL_PAD)
        zeros = tl.zeros([BLOCK_N, TAIL_PAD], dtype=tl.float32).to(tl.float8e4nv)
        tl.store(
            out_ptr + offs_n[:, None] * stride_on + KP + 3 * RB + offs_t[None, :],
            zeros,
            n_mask[:, None] & (offs_t < tail)[None, :],
        )
        tl.store(cs_ptr + offs_n, cs, n_mask)
        tl.store(g_ptr + offs_r, g, offs_r < tl.where(pid_n == 0, R, 0))
    else:
        offs_j = tl.arange(0, 32)
        if VARIANT == 0 or VARIANT == 1:
            if VARIANT == 0:
                steps = tl.minimum(GROUPS, KG - pid_k * GROUPS)
                for i in range(0, steps):
                    grp = pid_k * GROUPS + i
                    packed = tl.load(
                        q_ptr + grp * stride_qg + offs_n[:, None] * stride_qn + offs_j[None, :],
                        n_mask[:, None],
                        0,
                    )
                    ws = tl.load(ws_ptr + grp * stride_wsg + offs_n, n_mask, 0.0)
                    f = (ws * inv)[:, None]
                    codes_dst = out_ptr + offs_n[:, None] * stride_on + grp * 64 + offs_j[None, :]
                    tl.store(codes_dst, (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv), n_mask[:, None])
                    tl.store(
                        codes_dst + 32, (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv), n_mask[:, None]
                    )
            else:
                for i in tl.static_range(GROUPS):
                    grp = pid_k * GROUPS + i
                    ok_n = n_mask & (offs_n * 0 + grp < KG)
                    ok = ok_n[:, None]
                    packed = tl.load(
                        q_ptr + grp * stride_qg + offs_n[:, None] * stride_qn + offs_j[None, :], ok, 0
                    )
                    ws = tl.load(ws_ptr + grp * stride_wsg + offs_n, ok_n, 0.0)
                    f = (ws * inv)[:, None]
                    codes_dst = out_ptr + offs_n[:, None] * stride_on + grp * 64 + offs_j[None, :]
                    tl.store(codes_dst, (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv), ok)
                    tl.store(codes_dst + 32, (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv), ok)
        else:
            grp = pid_k * GROUPS + tl.arange(0, GROUPS)
            ok = n_mask[:, None, None] & (grp < KG)[None, :, None]
            packed = tl.load(
                q_ptr
                + grp[None, :, None] * stride_qg
                + offs_n[:, None, None] * stride_qn
                + offs_j[None, None, :],
                ok,
                0,
            )
            ws = tl.load(
                ws_ptr + grp[None, :] * stride_wsg + offs_n[:, None],
                n_mask[:, None] & (grp < KG)[None, :],
                0.0,
            )
            f = (ws * inv[:, None])[:, :, None]
            lo_c = (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv)
            hi_c = (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv)
            if VARIANT == 2:
                dst_c = (
                    out_ptr
                    + offs_n[:, None, None] * stride_on
                    + grp[None, :, None] * 64
                    + offs_j[None, None, :]
                )
                tl.store(dst_c, lo_c, ok)
                tl.store(dst_c + 32, hi_c, ok)
            else:
                rows = tl.reshape(tl.permute(tl.join(lo_c, hi_c), (0, 1, 3, 2)), (BLOCK_N, GROUPS * 64))
                cols = pid_k * GROUPS * 64 + tl.arange(0, GROUPS * 64)
                tl.store(
                    out_ptr + offs_n[:, None] * stride_on + cols[None, :],
                    rows,
                    n_mask[:, None] & (cols < KG * 64)[None, :],
                )


def probe(p: dict, variant: str, block_n: int, groups: int, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    qweight, wscale, l2, st = p["qweight"], p["wscale"], p["l2"], p["strength"]
    kg, n, _ = qweight.shape
    r = l2.shape[1]
    rb = rp.branch_block(r)
    kp = kg * 64
    kt = rp.total_k(kp, r)
    dev = qweight.device
    wq = torch.empty(n, kt, device=dev, dtype=torch.float8_e4m3fn)
    cs = torch.empty(n, device=dev)
    g = torch.empty(r, device=dev)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kg, groups) + 1)
    _expand_probe[grid](
        qweight, wscale, p["peaks"], l2, p["bound"], st, wq, cs, g,
        n, kg, kp, kt, r, rb, st.shape[0],
        qweight.stride(0), qweight.stride(1), wscale.stride(0), l2.stride(0), st.stride(0), wq.stride(0),
        FP4=p["fmt"] == "fp4", S_PAD=2, R_PAD=max(16, triton.next_power_of_2(rb)), TAIL_PAD=rp.K_ALIGN,
        VARIANT=VARIANTS.index(variant), BLOCK_N=block_n, GROUPS=groups, num_warps=warps,
    )  # fmt: skip
    return wq, cs


TILES = [(32, 8, 4), (32, 16, 4), (64, 4, 4), (64, 8, 4), (64, 16, 4), (128, 4, 4), (128, 8, 8), (16, 16, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="3072x3072,3072x12288,12288x3072")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--fmt", default="int4", choices=["int4", "fp4"])
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        p = make_w4(k, n, args.rank, args.fmt, "cuda")
        p["bound"] = rp.branch_bound(p["l1"], p["smooth_inv"])
        p["peaks"] = rp.weight_peaks(p["l2"], rp.residual_max(p["wscale"], args.fmt))
        call = (p["qweight"], p["wscale"], args.fmt, p["l2"], p["bound"], None, p["strength"])
        expect, cs_expect, _ = expand_weight_triton(*call, peaks=p["peaks"])
        t = bench(lambda: expand_weight_triton(*call, peaks=p["peaks"]))
        mb = (p["qweight"].numel() + p["wscale"].numel() * 4 + expect.numel()) / 1e6
        print(f"\n== {k}x{n} rank {args.rank}: {mb:.1f} MB moved; the kernel (autotuned "
              f"{_expand_weight_kernel.best_config}) {t:.1f} us", flush=True)  # fmt: skip
        for block_n, groups, warps in TILES:
            line = [f"  tile {block_n}x{groups} groups, {warps} warps:"]
            for variant in VARIANTS:
                try:
                    wq, cs = probe(p, variant, block_n, groups, warps)
                    same = torch.equal(wq.view(torch.uint8), expect.view(torch.uint8)) and torch.equal(
                        cs, cs_expect
                    )
                    t = bench(lambda: probe(p, variant, block_n, groups, warps))
                    line.append(f"{variant} {t:.1f} us{'' if same else ' (DIFFERS)'}")
                except Exception as err:  # noqa: BLE001 - a variant that does not compile prints why
                    line.append(f"{variant} failed: {str(err).splitlines()[0][:80]}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
