"""Markdown tables for ``bench/accuracy_w4_world.py`` (plain data in, text out)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from studio.kernels import FORMATS

LAYER_VARIANTS = {
    "bf16": "bf16",
    "fp8_rowwise": "FP8 row-wise",
    "int4_naive_fused": "INT4 naive (fused)",
    "int4_naive_prefill": "INT4 naive (prefill)",
    "int4_svdq_fused": "INT4 SVDQuant (fused)",
    "int4_svdq_prefill": "INT4 SVDQuant (prefill)",
    "int4_svdq_prefill_peak": "INT4 SVDQuant (prefill, calibrated peak)",
    "int4_svdq_prefill_row": "INT4 SVDQuant (prefill, row scales)",
    "fp4_naive_fused": "FP4 naive (fused)",
    "fp4_naive_prefill": "FP4 naive (prefill)",
    "fp4_svdq_fused": "FP4 SVDQuant (fused)",
    "fp4_svdq_prefill": "FP4 SVDQuant (prefill)",
    "fp4_svdq_prefill_peak": "FP4 SVDQuant (prefill, calibrated peak)",
    "fp4_svdq_prefill_row": "FP4 SVDQuant (prefill, row scales)",
}


def _md(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def tables(result: dict[str, Any]) -> str:
    layers = result["per_layer"]["layers"]
    kinds = [k for k in result["per_layer"]["kinds"] if any(r["kind"] == k for r in layers)]
    out = [f"Outlier structure of the captured activations (test rows; Gaussian of the same size: "
           f"max/median {result['per_layer']['gaussian_max_over_median']:.2f})", ""]  # fmt: skip
    rows = []
    for k in kinds:
        sel = [r for r in layers if r["kind"] == k]
        ratios = [r["max_over_median"] for r in sel]
        shapes = sorted({f"{r['K']}x{r['N']}" for r in sel})
        rows.append([k, len(sel), ", ".join(shapes), f"{np.median(ratios):.1f}", f"{max(ratios):.1f}",
                     f"{np.median([r['channels_over_5x'] for r in sel]):.0f}",
                     sum(r["smoothing_spread"]["int4"] > 1.0 for r in sel),
                     f"{np.median([r['smoothing_spread']['int4'] for r in sel]):.1f}"])  # fmt: skip
    out.append(_md(["layer kind", "layers", "K x N", "max/median (median)", "max/median (max)",
                    "channels > 5x median (median)", "SVDQuant INT4 picked smoothing (layers)",
                    "smoothing max/min (median)"], rows))  # fmt: skip
    out += ["", "Relative error vs the float64 layer (mean over layers unless named)", ""]
    rows = []
    for key, label in LAYER_VARIANTS.items():
        e = [r["errors"][key] for r in layers]
        per_kind = [np.mean([r["errors"][key] for r in layers if r["kind"] == k]) for k in kinds]
        rows.append([label, f"{np.mean(e):.4f}", f"{np.median(e):.4f}", f"{max(e):.4f}"]
                    + [f"{v:.4f}" for v in per_kind])  # fmt: skip
    out.append(_md(["variant", "mean", "median", "max", *kinds], rows))
    for fmt in FORMATS:
        reach = [r["errors"].get(f"{fmt}_test_peak_over_calibrated") for r in layers]
        reach = [v for v in reach if v is not None]
        if reach:
            out += ["", f"{fmt.upper()}: test rows' peak / calibrated peak (headroom included): median "
                    f"{np.median(reach):.2f}, max {max(reach):.2f}; layers clipped (> 1): "
                    f"{sum(v > 1 for v in reach)} of {len(reach)}"]  # fmt: skip
    out += ["", "SVDQuant vs naive 4-bit, layer by layer", ""]
    rows = []
    for fmt in FORMATS:
        for path in ("fused", "prefill"):
            ratio = {
                r["layer"]: r["errors"][f"{fmt}_svdq_{path}"] / r["errors"][f"{fmt}_naive_{path}"]
                for r in layers
            }
            worst = max(ratio, key=ratio.get)
            wins = sum(v < 1 for v in ratio.values())
            rows.append([f"{fmt.upper()} {path}", f"{wins}/{len(ratio)}", f"{np.mean(list(ratio.values())):.2f}",
                         f"{min(ratio.values()):.2f}", f"{ratio[worst]:.2f} ({worst})"])  # fmt: skip
    out.append(_md(["format, path", "layers where SVDQuant wins", "mean error ratio SVDQuant/naive",
                    "best ratio", "worst ratio (layer)"], rows))  # fmt: skip
    picks = sorted(layers, key=lambda r: -r["max_over_median"])[:4]
    worst = max(layers, key=lambda r: r["errors"]["int4_svdq_fused"] / r["errors"]["int4_naive_fused"])
    picks += [worst] if worst not in picks else []
    out += [
        "",
        "Representative layers (strongest outliers, and the layer where SVDQuant INT4 gains least)",
        "",
    ]
    keys = ["bf16", "fp8_rowwise", "int4_naive_fused", "int4_svdq_fused", "int4_svdq_prefill",
            "fp4_naive_fused", "fp4_svdq_fused", "fp4_svdq_prefill"]  # fmt: skip
    rows = [[r["layer"], f"{r['K']}x{r['N']}", r["rank"], f"{r['max_over_median']:.1f}"]
            + [f"{r['errors'][k]:.4f}" for k in keys] for r in picks]  # fmt: skip
    out.append(_md(["layer", "K x N", "rank", "max/median", *[LAYER_VARIANTS[k] for k in keys]], rows))
    if "end_to_end" in result:
        e2e = result["end_to_end"]
        out += ["", f"End to end: {e2e['images']} images (64x64) vs the fp32 pipeline", ""]
        attrs = [a for a in e2e["rows"][0]["accuracy"] if a != "all_three"]
        rows = [[r["variant"], f"{r['unet_eps_rel_err']:.4f}", _db(r["psnr_db"]), _db(r["psnr_median_db"]),
                 f"{r['mean_abs_diff']:.2f}", f"{r['clip_score']:.2f}"]
                + [f"{r['accuracy'][a]:.3f}" for a in (*attrs, "all_three")]
                + [f"{r['same_labels_as_fp32']:.3f}", str(r.get("saturated_layers", 0)), f"{r['generate_s']:.0f}"]
                for r in e2e["rows"]]  # fmt: skip
        out.append(_md(["UNet", f"UNet eps rel. error ({e2e['unet_calls']} calls)", "PSNR dB (all images)",
                        "PSNR dB (median image)", "mean abs diff (0-255)", "CLIP score", *attrs, "all three",
                        "same CLIP labels as fp32", "layers clipped", "CPU s (reference maths)"], rows))  # fmt: skip
    return "\n".join(out)


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"
