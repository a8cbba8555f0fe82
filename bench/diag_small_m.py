# ruff: noqa: B023  (closures are timed before the loop variables change)
"""Where the small-M path's time goes, on a GPU: the two ways of turning codes into bf16, per config.

    python bench/diag_small_m.py [--quick] [--ms 16,64] [--json out.json]

Per FLUX shape at M = 16 and 64 (INT4 and FP4; ``--ms`` for others): the whole path
autotuned, at 32 and 96 ranks; at 32 ranks also with the other way of finishing
(``finish_for`` picks one launch, where the program completing a column block adds the
partials, or a second epilogue kernel); every forced config, so the best tile with
bit-built bf16 codes (``MAGIC``) and with conversions through fp32; the fused path
(``path="fused"``, what ``auto`` took where N > K); and, for scale, a tiny kernel alone
(cuBLAS ``x @ l1``, the branch-input GEMM the path once launched).
Timing as ``bench_w4.bench`` (CUDA graphs, L2 flushed before each call); the ``stream``
columns time calls back to back on rotating weight copies (``bench_w4.bench_stream``), ours
and bf16 alike.  The 4-bit read floor at 3 TB/s and bf16 ``F.linear`` are printed beside.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import SHAPES, bench, bench_stream, copies_for_cold_l2, make_w4  # noqa: E402
from studio import kernels  # noqa: E402
from studio.kernels.small_m_triton import _split_configs, finish_for, w4_linear_small_m_triton  # noqa: E402


def floor_us(k: int, n: int) -> float:
    """4-bit codes plus fp32 group scales, read once at 3 TB/s."""
    return (k * n / 2 + k // 64 * n * 4) / 3e12 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="autotuned paths only, no forced configs")
    parser.add_argument("--ms", default="16,64", help="comma-separated row counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda")
        for fmt in ("int4", "fp4"):
            p32, p96 = make_w4(k, n, 32, fmt, "cuda"), make_w4(k, n, 96, fmt, "cuda")
            for m in [int(v) for v in args.ms.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

                def call(p: dict, **kw: object) -> torch.Tensor:
                    return w4_linear_small_m_triton(
                        x, p["smooth_inv"], p["qweight"], p["wscale"], fmt, p["l1"], p["l2"], p["strength"], 1,
                        bias, **kw,
                    )  # fmt: skip

                row = {"K": k, "N": n, "M": m, "fmt": fmt, "floor": floor_us(k, n)}
                row["bf16"] = bench(lambda: torch.nn.functional.linear(x, w_bf16, bias.bfloat16()))
                row["la_gemm_cublas"] = bench(lambda: x @ p32["l1"])
                row["auto"] = bench(lambda: call(p32))
                other = "epilogue" if finish_for(m) == "last" else "last"
                row["other_finish"] = bench(lambda: call(p32, finish=other))
                # back to back on rotating weight copies (decode through layers): ours vs bf16
                ours_copies = [p32] + [
                    make_w4(k, n, 32, fmt, "cuda") for _ in range(copies_for_cold_l2(k * n // 2) - 1)
                ]
                bf16_copies = [w_bf16] + [
                    torch.randn_like(w_bf16) for _ in range(copies_for_cold_l2(k * n * 2) - 1)
                ]
                row["stream_auto"] = bench_stream([lambda p=p: call(p) for p in ours_copies])
                row["stream_bf16"] = bench_stream(
                    [lambda w=w: torch.nn.functional.linear(x, w, bias.bfloat16()) for w in bf16_copies]
                )
                del ours_copies, bf16_copies
                row["auto_r96"] = bench(lambda: call(p96))
                row["fused_path"] = bench(
                    lambda: kernels.w4_linear(
                        x, p32["smooth_inv"], p32["qweight"], p32["wscale"], fmt, p32["l1"], p32["l2"],
                        p32["strength"], 1, bias, path="fused",
                    )
                )  # fmt: skip
                for cfg in [] if args.quick else _split_configs():
                    kw = cfg.all_kwargs()
                    if kw["SPLIT_K"] > max(1, (k // 64) // 2):
                        continue
                    tile = f"bn{kw['BLOCK_N']}_sk{kw['SPLIT_K']}_w{kw['num_warps']}_s{kw['num_stages']}"
                    for magic in (True, False):
                        way = "magic" if magic else "convert"
                        row[f"{way}_{tile}"] = bench(lambda: call(p32, config=kw, magic=magic))
                rows.append(row)
                best = {}
                for way in ("magic", "convert"):
                    forced = {c: v for c, v in row.items() if c.startswith(way + "_")}
                    name = min(forced, key=forced.get, default=None)
                    best[way] = f"{forced[name]:.1f} ({name[len(way) + 1 :]})" if name else "-"
                print(
                    f"{k}x{n} M={m} {fmt}: bf16 {row['bf16']:.1f} us, floor {row['floor']:.1f} us | "
                    f"auto {row['auto']:.1f} us (bf16/ours {row['bf16'] / row['auto']:.2f}x), r96 {row['auto_r96']:.1f}, "
                    f"finish {finish_for(m)} (other {row['other_finish']:.1f}) | "
                    f"stream: bf16 {row['stream_bf16']:.1f}, auto {row['stream_auto']:.1f} "
                    f"({row['stream_bf16'] / row['stream_auto']:.2f}x) | "
                    f"fused path {row['fused_path']:.1f} | "
                    f"best forced: magic {best['magic']}, convert {best['convert']} | "
                    f"tiny kernel alone {row['la_gemm_cublas']:.1f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
