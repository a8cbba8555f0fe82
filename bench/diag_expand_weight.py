# ruff: noqa: B023  (closures are timed before the loop variables change)
"""The large-M weight expansion (4-bit codes -> FP8) in other loop forms (GPU diagnostic).

    python bench/diag_expand_weight.py [--shapes 3072x3072,3072x12288,12288x3072] [--rank 32]

``prefill_triton._expand_weight_kernel`` unpacked one group of 64 codes per loop step until the
twenty-third session: a ``[BLOCK_N, 32]`` byte load, two ``[BLOCK_N, 32]`` FP8 stores.  It took 12.2 us on 3072x3072
and 28.5-28.9 us on the two large shapes (twenty-second session), about twice what its bytes
need at the bandwidth the same timing gives an FP8 cast of X.  Timed here after a 64 MB
memset (``bench_w4.bench``): the kernel as it runs, then its code columns alone (no branch
column: the channel scales are the kernel's) in each loop form at several tiles, checked bit
for bit against the kernel's codes (``joined`` is the kernel's form since the twenty-third
session, and calls its ``_expand_codes``):

- ``loop``: the kernel's loop until the twenty-third session: a group per step;
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
    _decode,
    _expand_codes,
    _expand_weight_kernel,
    expand_weight_triton,
)

VARIANTS = ("loop", "unrolled", "tile3d", "joined")


@triton.jit
def _codes_probe(
    q_ptr, ws_ptr, cs_ptr, out_ptr, N, KG, stride_qg, stride_qn, stride_wsg, stride_on,
    FP4: tl.constexpr, VARIANT: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """The expansion's code columns only, in ``VARIANT`` form, with the kernel's channel scales."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    inv = 1.0 / tl.load(cs_ptr + offs_n, n_mask, 1.0)
    if VARIANT == 3:  # the kernel's own form
        _expand_codes(q_ptr, ws_ptr, out_ptr, offs_n, n_mask, inv, pid_k, KG,
                      stride_qg, stride_qn, stride_wsg, stride_on, FP4, BLOCK_N, GROUPS)  # fmt: skip
    elif VARIANT == 2:
        grp = pid_k * GROUPS + tl.arange(0, GROUPS)
        offs_j = tl.arange(0, 32)
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
            ws_ptr + grp[None, :] * stride_wsg + offs_n[:, None], n_mask[:, None] & (grp < KG)[None, :], 0.0
        )
        f = (ws * inv[:, None])[:, :, None]
        dst = out_ptr + offs_n[:, None, None] * stride_on + grp[None, :, None] * 64 + offs_j[None, None, :]
        tl.store(dst, (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv), ok)
        tl.store(dst + 32, (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv), ok)
    elif VARIANT == 1:
        for i in tl.static_range(GROUPS):
            grp = pid_k * GROUPS + i
            _group_step(q_ptr, ws_ptr, out_ptr, offs_n, n_mask & (offs_n * 0 + grp < KG), inv, grp,
                        stride_qg, stride_qn, stride_wsg, stride_on, FP4)  # fmt: skip
    else:
        for grp in range(pid_k * GROUPS, tl.minimum(pid_k * GROUPS + GROUPS, KG)):
            _group_step(q_ptr, ws_ptr, out_ptr, offs_n, n_mask, inv, grp,
                        stride_qg, stride_qn, stride_wsg, stride_on, FP4)  # fmt: skip


@triton.jit
def _group_step(q_ptr, ws_ptr, out_ptr, offs_n, ok_n, inv, grp, stride_qg, stride_qn, stride_wsg, stride_on,
                FP4: tl.constexpr):  # fmt: skip
    """One group of 64 codes: a ``[BLOCK_N, 32]`` byte load, two 32-byte stores per row."""
    offs_j = tl.arange(0, 32)
    packed = tl.load(
        q_ptr + grp * stride_qg + offs_n[:, None] * stride_qn + offs_j[None, :], ok_n[:, None], 0
    )
    f = (tl.load(ws_ptr + grp * stride_wsg + offs_n, ok_n, 0.0) * inv)[:, None]
    dst = out_ptr + offs_n[:, None] * stride_on + grp * 64 + offs_j[None, :]
    tl.store(dst, (_decode(packed & 0xF, FP4) * f).to(tl.float8e4nv), ok_n[:, None])
    tl.store(dst + 32, (_decode(packed >> 4, FP4) * f).to(tl.float8e4nv), ok_n[:, None])


def probe(p: dict, cs: torch.Tensor, variant: str, block_n: int, groups: int, warps: int) -> torch.Tensor:
    """``[N, Kp]`` FP8: the code columns of the expansion, channel scales ``cs`` from the kernel."""
    qweight, wscale = p["qweight"], p["wscale"]
    kg, n, _ = qweight.shape
    wq = torch.empty(n, kg * 64, device=qweight.device, dtype=torch.float8_e4m3fn)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kg, groups))
    _codes_probe[grid](
        qweight, wscale, cs, wq, n, kg, qweight.stride(0), qweight.stride(1), wscale.stride(0), wq.stride(0),
        FP4=p["fmt"] == "fp4", VARIANT=VARIANTS.index(variant), BLOCK_N=block_n, GROUPS=groups, num_warps=warps,
    )  # fmt: skip
    return wq


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
        codes = expect[:, : p["qweight"].shape[0] * 64].contiguous().view(torch.uint8)
        for block_n, groups, warps in TILES:
            line = [f"  tile {block_n}x{groups} groups, {warps} warps:"]
            for variant in VARIANTS:
                try:
                    same = torch.equal(
                        probe(p, cs_expect, variant, block_n, groups, warps).view(torch.uint8), codes
                    )
                    t = bench(lambda: probe(p, cs_expect, variant, block_n, groups, warps))
                    line.append(f"{variant} {t:.1f} us{'' if same else ' (DIFFERS)'}")
                except Exception as err:  # noqa: BLE001 - a variant that does not compile prints why
                    line.append(f"{variant} failed: {str(err).splitlines()[0][:80]}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
