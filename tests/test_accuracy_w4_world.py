"""bench/accuracy_w4_world.py on a tiny config: real tiny-world activations, 2 sampling steps."""

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch


def _bench():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("accuracy_w4_world")


@pytest.fixture(scope="module")
def tiny_result():
    bench = _bench()
    cfg = bench.AccuracyConfig(
        calib_prompts=1,
        test_prompts=1,
        steps=2,
        rows_per_call=64,
        layers=r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.(attn1\.to_q|attn2\.to_k|ff\.net\.2)$",
        e2e_prompts=1,
        e2e_seeds=(0,),
        e2e_variants=("fp32 (baseline)", "int4 naive", "int4 SVDQuant r32 (fused)"),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the randomized SVD's small QRs crawl when 2 threads share busy cores
    try:
        return bench, bench.run(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_per_layer_svdquant_beats_naive_on_real_activations(tiny_result) -> None:
    bench, result = tiny_result
    layers = result["per_layer"]["layers"]
    assert [r["kind"] for r in layers] == [
        "attn q/k/v (image tokens)",
        "cross-attn k/v (text tokens)",
        "ff out",
    ]
    for r in layers:
        e = r["errors"]
        assert r["rows"] > 0 and r["max_over_median"] >= 1.0
        assert e["bf16"] < e["fp8_rowwise"] < e["int4_naive_fused"]
        for fmt in ("int4", "fp4"):
            for path in ("fused", "prefill"):
                assert e[f"{fmt}_svdq_{path}"] < e[f"{fmt}_naive_{path}"], (r["layer"], fmt, path)
            # One FP8 scale per operand (the large-M default) against per-token / per-channel ones.
            assert e[f"{fmt}_svdq_prefill"] < 1.25 * e[f"{fmt}_svdq_prefill_row"], (r["layer"], fmt)
        assert e["int4_svdq_fused"] < 0.08
    text = bench.tables(result)
    assert "INT4 SVDQuant (prefill)" in text and "End to end" in text


@pytest.mark.slow
def test_end_to_end_rows(tiny_result) -> None:
    _, result = tiny_result
    rows = {r["variant"]: r for r in result["end_to_end"]["rows"]}
    assert math.isinf(rows["fp32 (baseline)"]["psnr_db"]) and rows["fp32 (baseline)"]["mean_abs_diff"] == 0
    naive, svdq = rows["int4 naive"], rows["int4 SVDQuant r32 (fused)"]
    assert 20 < naive["psnr_db"] < svdq["psnr_db"] < 80
    assert 0 < svdq["clip_score"] <= 100
