# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Where the small-M kernel's GPU time goes, stage by stage, at fixed tiles.

    python bench/diag_small_m_stages.py [--shapes 3072x3072,3072x12288] [--ms 16,64] [--json out.json]

Per shape, M, INT4 and tile (BLOCK_N, SPLIT_K, warps, stages), each timed back to back on
rotating weight copies (``bench_w4.bench_stream``: GPU time, no launch gaps hidden by a
flush), with the same grid and loop as ``small_m_triton._w4_small_m_kernel``:

- ``read``: the packed codes only (xor-reduced, one int per column written);
- ``decode``: codes turned into bf16 (bit patterns) and summed with the group scales, no dot;
- ``dot``: the two K = 32 dots per group with the activations, partials written; no ``1/s``;
- ``scaled``: as ``dot`` plus what the kernel does to the activations per group (``x * 1/s``
  in fp32, INT4's row-sum correction);
- ``asm_dot``: as ``dot``, the codes decoded four bytes at a time by inline PTX
  (``_nibbles_by_asm``); its partials must equal ``dot``'s bit for bit (printed);
- ``swap_dot``, ``swap_asm``: as ``dot`` and ``asm_dot`` with the codes as the dot's left
  operand (``[BLOCK_N, BLOCK_M]`` sums: Hopper's wgmma takes them from registers);
- ``kernel``: the real launcher at that config, in each of ``VARIANTS``: one launch or two
  (``finish``), codes through fp32, by bit patterns, by asm or by asm in the wgmma operand's
  order (``fragment_order``), the codes as the dot's left
  or right operand (``swap``), the activations scaled by a pre-kernel (``prescale``) and the
  codes times their group scale before the dot (``scale_codes``); bf16 ``F.linear`` beside.
  Names: ``{finish}-{S}{P}{C}{F|M|A|R}``.  How far the variants' outputs are from each other is
  printed too (summation order only: under 1e-4; between variants with and without ``C``,
  the bf16 rounding of each scaled code too: about 1e-3 on these random weights).

The registers per thread of each stage kernel as compiled on this GPU are printed too (the
CPU's count, ``bench/diag_registers.py``, should agree).  Read: if ``read`` is already far
from the 3 TB/s floor, the tile does not keep enough bytes in flight; the steps between
stages are what decoding, the dot and finishing cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench_stream, parse_tiles, swept_layers  # noqa: E402
from bench.diag_small_m import floor_us  # noqa: E402
from studio.kernels.small_m_tiles import tile_config  # noqa: E402
from studio.kernels.small_m_triton import (  # noqa: E402
    _codes_as_bf16,
    _nibbles_by_asm,
    w4_linear_small_m_triton,
)

TILES = [
    (64, 4, 4, 3),
    (128, 8, 4, 4),
    (128, 16, 4, 4),
    (64, 16, 4, 4),
    (64, 8, 4, 3),
    (128, 8, 8, 3),
    (32, 8, 4, 3),
    (64, 8, 4, 5),
    (128, 8, 4, 5),
    (128, 4, 4, 4),
    (64, 16, 4, 5),
    (128, 2, 4, 4),
    (128, 4, 4, 5),
    (256, 4, 8, 4),
    # twelfth session: deeper pipelines with fewer splits, and splits of 3 / 6
    (128, 2, 4, 8),
    (128, 4, 4, 6),
    (128, 3, 4, 6),
    (256, 2, 8, 6),
    (64, 4, 4, 8),
    (128, 1, 4, 8),
    (256, 4, 8, 5),
    (128, 6, 4, 4),
    (64, 6, 4, 6),
    (256, 3, 8, 5),
]
STAGES = {"read": 0, "decode": 1, "dot": 2, "scaled": 3, "asm_dot": 4, "swap_dot": 5, "swap_asm": 6}
#: The real kernel's variants: finish (one launch or two), codes through fp32 (``F``), by bit
#: patterns (``M``), by asm (``A``) or in the wgmma operand's order (``R``, ``fragment_order``:
#: by asm up to ``MAX_FRAGMENT_ASM_ROWS`` rows, by bit patterns above); ``S``: the codes as the dot's left operand (``swap``);
#: ``P``: ``bf16(x * 1/s)`` by a small kernel first (``prescale``); ``C``: scaled codes.
#: (Commit 66ec51d also had ``L``, the codes prefetched into L2, ``D``, programmatic dependent
#: launches, and ``2``, two groups per loop step: measured in the twelfth session, none kept.)
VARIANTS = {
    f"{finish}-{'S' if swap else ''}{'P' if prescale else ''}{'C' if scaled else ''}{decode}": dict(
        finish=finish,
        swap=swap,
        prescale=prescale,
        scale_codes=scaled,
        magic=decode != "F",
        asm=True if decode == "A" else None if decode == "R" else False,
        fragment_order=decode == "R",
    )
    for finish in ("last", "epilogue")
    for swap in (False, True)
    for prescale in (False, True)
    for scaled in (False, True)
    for decode in ("F", "M", "A", "R")
}


@triton.jit
def _stage_kernel(
    x_ptr, sinv_ptr, q_ptr, ws_ptr, out_ptr, M, K, N, KG, stride_xm, stride_qg, stride_qn,
    STAGE: tl.constexpr, FP4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, 32)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    per_split = tl.cdiv(KG, SPLIT_K)
    g_end = tl.minimum(pid_k * per_split + per_split, KG)
    q_ptrs = q_ptr + offs_n[:, None] * stride_qn + offs_j[None, :]
    bits = tl.zeros([BLOCK_N, 32], dtype=tl.int32)
    summed = tl.zeros([BLOCK_N, 32], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for grp in range(pid_k * per_split, g_end):
        packed = tl.load(q_ptrs + grp * stride_qg, n_mask[:, None], 0)
        if STAGE == 0:
            bits ^= packed.to(tl.int32)
        else:
            ws = tl.load(ws_ptr + grp * N + offs_n, n_mask, 0.0)
            if (STAGE == 4) | (STAGE == 6):
                lo, hi = _nibbles_by_asm(packed)
            else:
                lo = _codes_as_bf16(packed & 0xF, FP4)
                hi = _codes_as_bf16(packed >> 4, FP4)
            if STAGE == 1:
                summed += (lo.to(tl.float32) + hi.to(tl.float32)) * ws[:, None]
            else:
                k_lo = grp * 64 + offs_j
                x_lo = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :], (offs_m < M)[:, None], 0.0
                )
                x_hi = tl.load(
                    x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :] + 32, (offs_m < M)[:, None], 0.0
                )
                if STAGE == 3:  # as the kernel: x * (1/s) in fp32, and INT4's row sums
                    x_lo = (x_lo.to(tl.float32) * tl.load(sinv_ptr + k_lo)[None, :]).to(tl.bfloat16)
                    x_hi = (x_hi.to(tl.float32) * tl.load(sinv_ptr + k_lo + 32)[None, :]).to(tl.bfloat16)
                if STAGE >= 5:  # weights as the left operand: [BLOCK_N, BLOCK_M] sums
                    part_t = tl.dot(lo, tl.trans(x_lo))
                    part_t = tl.dot(hi, tl.trans(x_hi), part_t)
                    acc_t += part_t * ws[:, None]
                else:
                    part = tl.dot(x_lo, tl.trans(lo))
                    part = tl.dot(x_hi, tl.trans(hi), part)
                    if STAGE == 3:
                        part -= 136.0 * tl.sum(x_lo.to(tl.float32) + x_hi.to(tl.float32), axis=1)[:, None]
                    acc += part * ws[None, :]
    if STAGE == 0:
        tl.store(out_ptr + pid_k * N + offs_n, tl.sum(bits, axis=1).to(tl.float32), n_mask)
    elif STAGE == 1:
        tl.store(out_ptr + pid_k * N + offs_n, tl.sum(summed, axis=1), n_mask)
    elif STAGE >= 5:
        dst = out_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None]
        tl.store(dst, acc_t, (offs_m < M)[None, :] & n_mask[:, None])
    else:
        dst = out_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :]
        tl.store(dst, acc, (offs_m < M)[:, None] & n_mask[None, :])


def stage_call(stage: str, x: torch.Tensor, p: dict, out: torch.Tensor, tile: tuple) -> object:
    bn, sk, warps, stages = tile
    m, k = x.shape
    kg, n, _ = p["qweight"].shape
    return _stage_kernel[(triton.cdiv(n, bn), sk)](
        x, p["smooth_inv"], p["qweight"], p["wscale"], out, m, k, n, kg, x.stride(0), p["qweight"].stride(0),
        p["qweight"].stride(1),
        STAGE=STAGES[stage], FP4=p["fmt"] == "fp4", BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=bn,
        SPLIT_K=sk, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="3072x3072,3072x12288")
    parser.add_argument("--ms", default="16,64")
    parser.add_argument("--tiles", default=None, help="indices into TILES, e.g. 0,1 (default: all)")
    parser.add_argument("--stages", default=",".join(STAGES), help="stage kernels to time ('' for none)")
    parser.add_argument(
        "--variants", default="last-F,last-M,last-A,last-SF,last-SM,last-SA,epilogue-F,epilogue-SM",
        help=f"real-kernel variants, of: {','.join(VARIANTS)}",
    )  # fmt: skip
    parser.add_argument(
        "--tile-list", default=None, help="tiles as BLOCK_N,SPLIT_K,warps,stages;... (not --tiles)"
    )
    parser.add_argument(
        "--hot", action="store_true", help="also time each variant on one weight copy (L2 warm: no DRAM read)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    tiles = TILES if args.tiles is None else [TILES[int(i)] for i in args.tiles.split(",")]
    if args.tile_list:
        tiles = parse_tiles(args.tile_list)
    stages_run = [st for st in args.stages.split(",") if st]
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    rows = []
    for k, n, m, x, (_, bias, bf16_copies, p, copies) in swept_layers(args.shapes, args.ms):
        out = torch.empty(16, m, n, device="cuda")
        bf16 = bench_stream([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16_copies])
        print(f"{k}x{n} M={m}: bf16 {bf16:.1f} us, 4-bit floor {floor_us(k, n):.1f} us", flush=True)
        for tile in tiles:
            row = {"k": k, "n": n, "m": m, "tile": tile, "bf16": bf16}
            partials = {}
            for stage in stages_run:
                out.zero_()
                compiled = stage_call(stage, x, p, out, tile)
                partials[stage] = out[: tile[1]].clone()
                row[f"{stage}_regs"] = compiled.n_regs
                row[stage] = bench_stream([lambda c=c: stage_call(stage, x, c, out, tile) for c in copies])
            if "dot" in partials and "asm_dot" in partials:
                row["asm_matches"] = bool(torch.equal(partials["dot"], partials["asm_dot"]))
            cfg = tile_config(tile)
            outs = {}
            for name, variant in variants.items():

                def real(c: dict) -> torch.Tensor:
                    return w4_linear_small_m_triton(
                        x, c["smooth_inv"], c["qweight"], c["wscale"], "int4", c["l1"], c["l2"],
                        c["strength"], 1, bias, config=cfg, **variant,
                    )  # fmt: skip

                outs[name] = real(copies[0]).float()
                row[name] = bench_stream([lambda c=c: real(c) for c in copies])
                if args.hot:
                    row[name + "_hot"] = bench_stream([lambda: real(copies[0])])
            first = next(iter(outs.values()))
            diffs = {name: ((o - first).norm() / first.norm()).item() for name, o in outs.items()}
            row["worst_variant"] = max(diffs, key=diffs.get)
            row["worst_rel_diff"] = diffs[row["worst_variant"]]
            rows.append(row)
            kernel = ", ".join(
                f"{name} {row[name]:.1f}" + (f" (hot {row[name + '_hot']:.1f})" if args.hot else "")
                for name in variants
            )
            stages = " | ".join(f"{st} {row[st]:.1f} ({row[st + '_regs']} regs)" for st in stages_run)
            print(
                f"  tile {tile}: {stages} | asm decode exact: {row.get('asm_matches')} | kernel: {kernel}"
                f" | variants differ by {row['worst_rel_diff']:.1e} ({row['worst_variant']})",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
