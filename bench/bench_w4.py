# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""Benchmark the fused low-rank + 4-bit linear against the baselines a Hopper user has.

    python bench/bench_w4.py [--quick] [--json out.json]
    python bench/bench_w4.py --tables run_a.json run_b.json   # re-print saved runs as one table

Times (medians of CUDA-graph replays, L2 flushed before every call, see ``bench``) at FLUX.1 shapes,
side by side in one run: bf16 ``F.linear``; bf16 + unfused LoRA; FP8 ``_scaled_mm``
bare (per-tensor scales, activations already FP8) and with row-wise activation
quantization included; FP8 + unfused low-rank; ``torch._int_mm`` (INT8, quantization
included); int4 weight-only (torchao's tinygemm, ``int4_baselines.py``); ours (INT4 and FP4 E2M1) as the layer
runs it (``path="auto"``) and each of its paths forced: ``fused`` (pre-pass + 4-bit
GEMM, branch in the epilogue), ``prefill`` (4-bit weights expanded to FP8, cuBLAS FP8
with the branch appended along K) and, up to 64 rows, ``small`` (bf16 activations,
split-K over the 4-bit weights); from ``PREFILL_MIN_M`` rows, ours with the layer's opt-in
calibrated activation peak too (``_peak`` columns: X read once); ours with the low-rank
branch unfused; the time of a strength change on a quantized layer.  Up to 64 rows, bf16 and ours (INT4, the layer's path)
are also timed back to back on cold weight copies (``bench_stream``: a decode step through
many layers, no memset between calls).  Then an accuracy table: relative error
against the float64 layer on synthetic activations with outlier channels (the calibrated
peak's row too, and whether the test activations passed it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.int4_baselines import error_line, int4_weight_only  # noqa: E402
from studio import kernels  # noqa: E402
from studio.kernels.gemm_w4_triton import _w4_gemm_kernel  # noqa: E402
from studio.kernels.reference_prefill import branch_bound, residual_max, weight_peaks  # noqa: E402

SHAPES = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072)]  # (K, N)
MS = [16, 64, 256, 1024, 4608]


_FLUSH: list[torch.Tensor] = []


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(fn, reps: int = 20, evict: str = "write") -> float:
    """Median GPU time of ``fn`` in us, from CUDA-graph replays with L2 flushed before each call.

    Graphs remove the Python launch cost (which dominated small-M timings under plain
    ``do_bench`` on the device's CPU); a 64 MB memset before every call evicts the 50 MB
    L2, and the time of a graph of memsets alone is subtracted.  The memset leaves L2 full
    of written lines, which the timed call then pays to write back; ``evict="read"`` evicts
    by reading the 64 MB instead (a max over it), so that L2 holds clean lines.
    """
    if evict not in ("write", "read"):
        raise ValueError(f"evict must be 'write' or 'read', not {evict!r}")
    if not _FLUSH:
        _FLUSH.append(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    flush = _FLUSH[0]
    try:
        fn()  # compile, autotune, allocate workspaces outside the capture
        torch.cuda.synchronize()
        graphs = []
        for with_fn in (True, False):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    if evict == "write":
                        flush.zero_()
                    else:
                        flush.view(torch.int64).amax()
                    if with_fn:
                        fn()
            graphs.append(graph)
        _replay_ms(graphs[0])
        return max(_replay_ms(graphs[0]) - _replay_ms(graphs[1]), 0.0) / reps * 1e3
    except Exception as err:  # noqa: BLE001 - a baseline the device cannot run prints as n/a
        print(f"  (skipped: {error_line(err, 100)})")
        return math.nan


def bench_stream(fns: list, reps: int = 48) -> float:
    """Median GPU time per call in us, calls back to back in one CUDA graph, no flush between.

    ``fns`` run in turn, each on its own copy of the weights; with copies adding up to more
    than the 50 MB L2, every call reads its weights from DRAM, as each layer of a decode step
    does.  Unlike ``bench`` no flush kernel runs before each call, so what a launch costs in
    a stream of launches (not after a 64 MB memset) is what is measured.
    """
    try:
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fns[i % len(fns)]()
        _replay_ms(graph)
        return _replay_ms(graph) / reps * 1e3
    except Exception as err:  # noqa: BLE001 - as in bench
        print(f"  (skipped: {error_line(err, 100)})")
        return math.nan


def both_timings(call, first: object, copies: list) -> dict[str, float]:
    """``call(first)`` timed after a memset (``bench``) and ``call`` over ``copies`` back to
    back (``bench_stream``): ``{"flush": us, "stream": us}``."""
    return {
        "flush": bench(lambda: call(first)),
        "stream": bench_stream([lambda c=c: call(c) for c in copies]),
    }


def fastest(times: dict[str, dict[str, float]]) -> tuple[str, str]:
    """The keys of ``times`` (each ``both_timings``'s result) that were fastest after the memset
    and back to back."""
    return min(times, key=lambda t: times[t]["flush"]), min(times, key=lambda t: times[t]["stream"])


def copies_for_cold_l2(weight_bytes: int, total: int = 160 << 20) -> int:
    """How many weight copies ``bench_stream`` needs so that none is still in L2 (50 MB)."""
    return max(2, -(-total // max(weight_bytes, 1)))


def cold_copies(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], dict, list[dict]]:
    """For back-to-back timing of one K x N layer: (bf16 weight, fp32 bias, copies of the weight,
    INT4 rank-32 packed weights, copies of those), enough copies each that none is still in L2."""
    w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    bf16_copies = [w_bf16.clone() for _ in range(copies_for_cold_l2(w_bf16.numel() * 2))]
    p = make_w4(k, n, 32, "int4", "cuda")
    copies = [dict(p, qweight=p["qweight"].clone()) for _ in range(copies_for_cold_l2(p["qweight"].numel()))]
    return w_bf16, bias, bf16_copies, p, copies


def swept_layers(shapes: str, ms: str) -> Iterator[tuple[int, int, int, torch.Tensor, tuple]]:
    """``(k, n, m, x, cold_copies(k, n))`` for each ``KxN`` of ``shapes`` and each row count of
    ``ms`` (both comma-separated), random bf16 ``x [m, k]``, seeded."""
    torch.manual_seed(0)
    for shape in shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        cold = cold_copies(k, n)
        for m in [int(v) for v in ms.split(",")]:
            yield k, n, m, torch.randn(m, k, device="cuda", dtype=torch.bfloat16), cold


def sweep_args(
    doc: str, script: str, ms: str = "16", more: Callable[[argparse.ArgumentParser], object] | None = None
) -> argparse.Namespace:
    """The small-M diag scripts' command line (``--shapes``, ``--ms``, ``--json``, and what
    ``more`` adds to the parser), parsed; exits with a message where there is no CUDA GPU."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=ms)
    ap.add_argument("--json", default=None)
    if more is not None:
        more(ap)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    return args


def parse_tiles(text: str) -> list[tuple[int, ...]]:
    """``"BLOCK_N,SPLIT_K,warps,stages;..."`` as tuples."""
    return [tuple(int(v) for v in t.split(",")) for t in text.split(";")]


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = (x.abs().amax(1, keepdim=True).float() / 448.0).clamp_min(1e-12)
    return (x / s).to(torch.float8_e4m3fn), s


def make_w4(k: int, n: int, rank: int, fmt: str, dev: str) -> dict:
    """Random packed weights of the right shapes (speed does not depend on the values)."""
    kg = kernels.padded_k(k) // kernels.GROUP
    rp = -(-rank // 16) * 16
    return {
        "smooth_inv": torch.rand(k, device=dev) + 0.5,
        "qweight": torch.randint(0, 256, (kg, n, 32), device=dev, dtype=torch.uint8),
        "wscale": torch.rand(kg, n, device=dev) * 1e-3,
        "fmt": fmt,
        "l1": torch.randn(k, rp, device=dev, dtype=torch.bfloat16) * 0.02,
        "l2": torch.randn(n, rp, device=dev, dtype=torch.bfloat16) * 0.02,
        "strength": torch.ones(1, rp, device=dev),
    }


def cache_factors(p: dict) -> dict:
    """The large-M path's weight-only factors, cached as SVDQuantLinear caches them."""
    p["bound"] = branch_bound(p["l1"], p["smooth_inv"]) if p["l1"].shape[1] else None
    p["wmax"] = residual_max(p["wscale"], p["fmt"])
    p["peaks"] = weight_peaks(p["l2"], p["wmax"])
    return p


def calibrated_peak(p: dict, k: int, dev: str, headroom: float = 2.0) -> torch.Tensor:
    """The layer's calibrated activation peak as ``SVDQuantLinear.from_linear`` sets it (largest
    ``|x * smooth_inv|`` of a separate calibration batch times the default headroom), for the
    bench's Gaussian activations; values do not change the timings."""
    calib = torch.randn(512, k, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    return ((calib * p["smooth_inv"]).abs().amax() * headroom).reshape(1)


def ours(x: torch.Tensor, p: dict, bias: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """The layer's call: the large-M path measures each batch's peak (``SVDQuantLinear``'s
    default), or with ``p["act_peak"]`` takes the calibrated peak (``use_act_peak``, opt-in)."""
    return kernels.w4_linear(
        x, p["smooth_inv"], p["qweight"], p["wscale"], p["fmt"], p["l1"], p["l2"], p["strength"], 1, bias,
        path=path, bound=p.get("bound"), wmax=p.get("wmax"), peaks=p.get("peaks"),
        act_peak=p.get("act_peak"), act_seen=p.get("act_seen"),
    )  # fmt: skip


def strength_change_us() -> float:
    """Median wall time of ``set_strength`` on a quantized 3072x3072 layer with a LoRA (GPU)."""
    import time

    from torch import nn

    from adapters.base import inject, set_strength
    from adapters.lora import LoraSpec
    from adapters.svdquant import SVDQuantLinear

    lin = nn.Linear(3072, 3072).cuda()
    model = nn.Sequential(SVDQuantLinear.from_linear(lin, torch.randn(256, 3072, device="cuda"), rank=32))
    inject(model, LoraSpec(targets=["0"], rank=64), "style")
    model(torch.randn(1, 16, 3072, device="cuda"))  # builds the branch
    times = []
    for i in range(200):
        torch.cuda.synchronize()
        start = time.perf_counter()
        set_strength(model, "style", 0.5 + (i % 7) / 10)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[len(times) // 2]


def speed(shapes: list[tuple[int, int]], ms: list[int], ranks: list[int]) -> list[dict]:
    dev = "cuda"
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        bias = torch.randn(n, device=dev) * 0.1
        bias16 = bias.to(torch.bfloat16)
        w8 = w.to(torch.float8_e4m3fn)
        w8t = w8.t()
        one = torch.ones((), device=dev)
        wscale_row = torch.full((1, n), 1.0, device=dev)
        wi8t = torch.randint(-127, 127, (n, k), device=dev, dtype=torch.int8).t()
        int4_fn, int4_label = int4_weight_only(w, bias)
        print(f"int4 weight-only baseline at {k}x{n}: {int4_label}", flush=True)
        packs = {
            (fmt, r): cache_factors(make_w4(k, n, r, fmt, dev)) for fmt in ("int4", "fp4") for r in ranks
        }
        peaked = {key: dict(p, act_peak=calibrated_peak(p, k, dev)) for key, p in packs.items()}
        bare = make_w4(k, n, 0, "int4", dev)
        bare["l1"], bare["l2"], bare["strength"] = (
            bare["l1"][:, :0],
            bare["l2"][:, :0],
            bare["strength"][:, :0],
        )
        cache_factors(bare)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            x8 = x.to(torch.float8_e4m3fn)
            row = {"K": k, "N": n, "M": m}
            row["bf16"] = bench(lambda: F.linear(x, w, bias16))
            row["fp8_bare"] = bench(
                lambda: torch._scaled_mm(x8, w8t, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
            )

            def fp8_q() -> torch.Tensor:
                xq, s = rowwise_fp8(x)
                return torch._scaled_mm(
                    xq, w8t, scale_a=s, scale_b=wscale_row, bias=bias16, out_dtype=torch.bfloat16
                )

            row["fp8_q"] = bench(fp8_q)

            def int8_q() -> torch.Tensor:
                s = x.abs().amax(1, keepdim=True).float() / 127.0
                xi = (x / s).round().to(torch.int8)
                return (torch._int_mm(xi, wi8t).float() * s).to(torch.bfloat16) + bias16

            row["int8_q"] = bench(int8_q)
            row["int4_wo"] = bench(lambda: int4_fn(x)) if int4_fn is not None else math.nan
            row["int4_wo_label"] = int4_label
            for r in ranks:
                a = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.02
                b = torch.randn(n, r, device=dev, dtype=torch.bfloat16) * 0.02
                row[f"bf16+lora{r}"] = bench(lambda: F.linear(x, w, bias16) + F.linear(F.linear(x, a), b))
                row[f"fp8_q+lr{r}"] = bench(lambda: fp8_q() + F.linear(F.linear(x, a), b))
                row[f"w4+lr{r}_unfused"] = bench(lambda: ours(x, bare, bias) + F.linear(F.linear(x, a), b))
                for fmt in ("int4", "fp4"):
                    p = packs[(fmt, r)]
                    row[f"{fmt}_r{r}"] = bench(lambda: ours(x, p, bias))
                    if m >= kernels.PREFILL_MIN_M:  # the large-M path with the calibrated peak
                        row[f"{fmt}_r{r}_peak"] = bench(lambda: ours(x, peaked[(fmt, r)], bias))
                    for path in ("fused", "prefill") + (("small",) if m <= kernels.SMALL_M_MAX else ()):
                        row[f"{path}_{fmt}_r{r}"] = bench(lambda: ours(x, p, bias, path))
                    row[f"{fmt}_r{r}_cfg"] = str(_w4_gemm_kernel.best_config)
                    # Breakdown: the pre-pass alone and the GEMM alone.
                    args = kernels.quantize_act(x, p["smooth_inv"], p["l1"], p["strength"], 1)
                    row[f"prepass_r{r}"] = bench(
                        lambda: kernels.quantize_act(x, p["smooth_inv"], p["l1"], p["strength"], 1)
                    )
                    row[f"gemm_{fmt}_r{r}"] = bench(
                        lambda: kernels.gemm_w4(
                            *args[:2], p["qweight"], p["wscale"], fmt, args[2], p["l2"], bias
                        )
                    )
            if m <= kernels.SMALL_M_MAX:  # a decode step: back to back on cold weight copies, no memset
                w_copies = [w] + [w.clone() for _ in range(copies_for_cold_l2(w.numel() * 2) - 1)]
                row["bf16_stream"] = bench_stream([lambda c=c: F.linear(x, c, bias16) for c in w_copies])
                p = packs[("int4", ranks[0])]
                p_copies = [p] + [
                    dict(p, qweight=p["qweight"].clone())
                    for _ in range(copies_for_cold_l2(p["qweight"].numel()) - 1)
                ]
                row[f"int4_r{ranks[0]}_stream"] = bench_stream(
                    [lambda c=c: ours(x, c, bias) for c in p_copies]
                )
                del w_copies, p_copies
            rows.append(row)
            print(
                json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}),
                flush=True,
            )
    return rows


def print_table(rows: list[dict], ranks: list[int]) -> None:
    r0, r1 = ranks[0], ranks[-1]
    cols = ["bf16", f"bf16+lora{r0}", "fp8_bare", "fp8_q", f"fp8_q+lr{r0}", "int8_q", "int4_wo"]
    cols += [f"w4+lr{r0}_unfused"]
    cols += [f"fused_int4_r{r0}", f"prefill_int4_r{r0}", f"small_int4_r{r0}"]
    cols += [f"fused_fp4_r{r0}", f"prefill_fp4_r{r0}", f"small_fp4_r{r0}"]
    cols += [f"int4_r{r0}", f"fp4_r{r0}"] + ([f"int4_r{r1}", f"fp4_r{r1}"] if r1 != r0 else [])
    cols += [f"int4_r{r0}_peak", f"fp4_r{r0}_peak"] + (
        [f"int4_r{r1}_peak", f"fp4_r{r1}_peak"] if r1 != r0 else []
    )
    print("\ntimes in us (CUDA-graph replay median, L2 flushed before each call)")
    print("| K x N | M | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for row in rows:
        vals = " | ".join(f"{row.get(c, math.nan):.1f}" for c in cols)
        print(f"| {row['K']}x{row['N']} | {row['M']} | {vals} |")
    print("\nratios (best of int4/fp4 at rank r0 unless named; 'peak': the large-M path with the layer's")
    print("calibrated activation peak, opt-in, X read once; its columns take its own faster format)")
    print(
        "| K x N | M | bf16/ours | ours/fp8_bare | ours/fp8_q | int4_wo/ours | unfused/ours | +64 ranks | fmt "
        "| bf16/ours, stream (int4) | bf16/ours, peak | ours/fp8_bare, peak | +64 ranks, peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fmt = "int4" if row[f"int4_r{r0}"] <= row[f"fp4_r{r0}"] else "fp4"
        t = row[f"{fmt}_r{r0}"]
        more_ranks = f"{row[f'{fmt}_r{r1}'] / t - 1:+.1%}" if r1 != r0 else "-"  # (one rank: not measured)
        ours_stream = row.get(f"int4_r{r0}_stream")
        stream = f"{row['bf16_stream'] / ours_stream:.2f}x" if ours_stream else "-"
        peak = "- | - | -"
        if f"int4_r{r0}_peak" in row:
            pf = "int4" if row[f"int4_r{r0}_peak"] <= row[f"fp4_r{r0}_peak"] else "fp4"
            tp = row[f"{pf}_r{r0}_peak"]
            more = f"{row[f'{pf}_r{r1}_peak'] / tp - 1:+.1%}" if r1 != r0 else "-"
            peak = f"{row['bf16'] / tp:.2f}x | {tp / row['fp8_bare']:.2f} | {more}"
        print(
            f"| {row['K']}x{row['N']} | {row['M']} | {row['bf16'] / t:.2f}x | {t / row['fp8_bare']:.2f} | "
            f"{t / row['fp8_q']:.2f} | {row['int4_wo'] / t:.2f}x | {row[f'w4+lr{r0}_unfused'] / t:.2f}x | "
            f"{more_ranks} | {fmt} | {stream} | {peak} |"
        )


def synth_activations(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Token activations with a few outlier channels (x10-x60), as seen in DiT/UNet layers."""
    x = torch.randn(rows, k, generator=gen)
    idx = torch.randperm(k, generator=gen)[: max(4, k // 256)]
    x[:, idx] *= 10 + 50 * torch.rand(len(idx), generator=gen)
    return x


def accuracy(shapes: list[tuple[int, int]], rank: int) -> list[dict]:
    from torch import nn

    from adapters.svdquant import SVDQuantConfig, SVDQuantLinear

    gen = torch.Generator().manual_seed(0)
    out = []
    for k, n in shapes:
        lin = nn.Linear(k, n).cuda()
        with torch.no_grad():  # a weight with a few strong input directions, like trained layers
            lin.weight.mul_(1 + 4 * (torch.rand(k, generator=gen) < 0.01).float().cuda())
        calib = synth_activations(512, k, gen).cuda()
        test = synth_activations(1024, k, gen).cuda().to(torch.bfloat16)
        y64 = test.double() @ lin.weight.double().t() + lin.bias.double()
        row = {"K": k, "N": n}
        with torch.no_grad():
            row["bf16"] = _rel(F.linear(test, lin.weight.bfloat16(), lin.bias.bfloat16()), y64)
            xq, s = rowwise_fp8(test)
            w8s = lin.weight.abs().amax(1, keepdim=True) / 448.0
            w8 = (lin.weight / w8s).to(torch.float8_e4m3fn)
            row["fp8_rowwise"] = _rel((xq.float() * s) @ (w8.float() * w8s).t() + lin.bias, y64)
            for fmt in ("int4", "fp4"):
                naive = SVDQuantLinear.from_linear(
                    lin, calib, config=SVDQuantConfig(rank=0, fmt=fmt, alphas=(None,))
                )
                row[f"{fmt}_naive"] = _rel(naive(test), y64)
                q = SVDQuantLinear.from_linear(lin, calib, config=SVDQuantConfig(rank=rank, fmt=fmt))
                row[f"{fmt}_svdq_r{rank}"] = _rel(q(test), y64)  # 1024 rows: the large-M path
                q.use_act_peak = True  # opt-in: the calibrated peak (test outliers sit elsewhere)
                row[f"{fmt}_svdq_r{rank}_peak"] = _rel(q(test), y64)
                row[f"{fmt}_peak_clipped"] = q.saturated()  # test values above the calibrated peak
                fused = kernels.w4_linear(
                    test, q.smooth_inv, q.qweight, q.wscale, fmt, q.l1, q.l2, q.strength, 1, q.bias.float(),
                    path="fused",
                )  # fmt: skip
                row[f"{fmt}_svdq_r{rank}_fused"] = _rel(fused, y64)
        out.append(row)
        print(
            json.dumps({k2: (round(v, 5) if isinstance(v, float) else v) for k2, v in row.items()}),
            flush=True,
        )
    return out


def print_saved_tables(paths: list[Path], ranks: list[int]) -> None:
    """Print the speed tables of saved ``--json`` runs, merged and sorted by M then shape.

    A full run at every M takes longer than one GPU session's command may, so runs are often
    saved one shape at a time; this prints them as one table.  Each row keeps the numbers its
    own run measured; a shape and M measured twice is an error (which one to keep is not ours
    to guess).
    """
    r0, r1 = ranks[0], ranks[-1]
    needed = ["bf16", "fp8_bare", "fp8_q", "int4_wo", f"w4+lr{r0}_unfused"]
    needed += [f"{fmt}_r{r}" for fmt in ("int4", "fp4") for r in (r0, r1)]
    rows: dict[tuple[int, int, int], dict] = {}
    for path in paths:
        try:
            saved = json.loads(path.read_text())["speed"]
            keys = [(row["M"], row["K"], row["N"]) for row in saved]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: not a bench_w4 --json file ({err!r})") from None
        for key, row in zip(keys, saved):
            if key in rows:
                raise SystemExit(f"{path}: K x N = {key[1]}x{key[2]} at M = {key[0]} is in two files")
            missing = [col for col in needed if col not in row]
            if missing:
                raise SystemExit(
                    f"{path}: no {', '.join(missing)} (was it run with other --ranks than {r0},{r1}?)"
                )
            rows[key] = row
    print_table([rows[key] for key in sorted(rows)], ranks)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape, two M values")
    parser.add_argument("--ranks", default="32,96", help="ranks of the low-rank branch (base, base+64)")
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--ms", default=None, help="comma-separated M values (default: all)")
    parser.add_argument("--shapes", default=None, help="comma-separated KxN shapes (default: the FLUX ones)")
    parser.add_argument(
        "--prepass", choices=["rows", "split"], default=None, help="large-M pre-pass (default: the layer's)"
    )
    parser.add_argument(
        "--scaling", choices=["row", "tensor"], default=None, help="large-M FP8 scales (default: the layer's)"
    )
    parser.add_argument(
        "--tables",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the tables of saved runs (their --json files, merged; e.g. one per shape) and exit",
    )
    args = parser.parse_args()
    if args.tables:
        print_saved_tables([Path(p) for p in args.tables], [int(r) for r in args.ranks.split(",")])
        return
    if args.scaling:
        from studio.kernels import reference_prefill

        reference_prefill.DEFAULT_SCALING = args.scaling
    if args.prepass:
        from studio.kernels import prefill_triton

        prefill_triton.DEFAULT_PREPASS = args.prepass
    torch.manual_seed(0)
    ranks = [int(r) for r in args.ranks.split(",")]
    shapes, ms = (SHAPES[:1], [16, 4608]) if args.quick else (SHAPES, MS)
    ms = [int(m) for m in args.ms.split(",")] if args.ms else ms
    if args.shapes:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    from studio.kernels import prefill_triton, reference_prefill

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  prepass {prefill_triton.DEFAULT_PREPASS}"
        f"  scaling {reference_prefill.DEFAULT_SCALING}"
    )
    rows = speed(shapes, ms, ranks)
    change = strength_change_us()
    print(
        f"strength change on a quantized 3072x3072 layer with a rank-64 LoRA: {change:.1f} us (median of 200)"
    )
    acc = [] if args.no_accuracy else accuracy(shapes, ranks[0])
    print_table(rows, ranks)
    if acc:
        keys = list(acc[0])[2:]
        print("\nrelative error vs the float64 layer (synthetic activations with outlier channels)")
        print("| K x N | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for row in acc:
            print(f"| {row['K']}x{row['N']} | " + " | ".join(f"{row[c]:.4f}" for c in keys) + " |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"speed": rows, "accuracy": acc, "strength_change_us": change}, indent=1)
        )


if __name__ == "__main__":
    main()
