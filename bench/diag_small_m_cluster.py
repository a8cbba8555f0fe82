# ruff: noqa: B023  (every closure below is timed before its loop variables change)
"""The 16-row layer with its split-K sums added in clusters, against the Gluon layer as it runs.

    python bench/diag_small_m_cluster.py [--shapes 3072x3072,...] [--tiles "64,8,4,3;128,4,4,3"]

Per FLUX shape (16 rows, INT4, a bias), timed as ``bench_w4`` times (after a 64 MB memset):
- bf16 ``F.linear`` and the Gluon layer (``w4_linear_small_m_gluon``) at its pinned tile,
  rank 32 and rank 0;
- the cluster layer's pre-kernel alone (``x @ l1`` in clusters of 8 or 16, without and with
  the activations' scaling);
- per tile, the cluster layer (``w4_linear_small_m_cluster``) at rank 32, activations scaled
  by its pre-kernel (``pre``) or in its column programs (``in``), with its relative error
  against the reference;
- per tile, at rank 0 (no pre-kernel), the cluster layer as it runs (``exchange``), the
  same kernel with the exchange left out (``no exchange``: each CTA writes its own
  partials, a wrong result that times the product and the cluster launch alone), and that
  launched without clusters (``plain``); and the first's timeline from its stamps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_w4 import bench, parse_tiles, swept_layers  # noqa: E402
from bench.diag_small_m_gluon_layer import layer_args  # noqa: E402
from studio.kernels.reference_small_m import w4_linear_small_m  # noqa: E402
from studio.kernels.small_m_gluon_cluster import launch_layer, prepare, w4_linear_small_m_cluster  # noqa: E402
from studio.kernels.small_m_gluon_layer import w4_linear_small_m_gluon  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def rank0_layer(
    x: torch.Tensor,
    p: dict,
    bias: torch.Tensor,
    tile: tuple,
    clusters: bool,
    exchange: bool,
    times: torch.Tensor | None = None,
) -> None:
    """The cluster layer's kernel at rank 0, activations scaled in it; ``exchange`` False
    leaves the exchange out (wrong output), ``clusters`` False launches it plainly; ``times``:
    int64 ``[CTAs, 4]`` for its stamps (``_w4_cluster_layer_kernel``'s ``TIMES``)."""
    out = torch.empty(x.shape[0], p["qweight"].shape[1], device=x.device, dtype=x.dtype)
    s = p["wscale"]
    launch_layer(x, p["smooth_inv"], p["qweight"], s, x, x, s, bias, out, 0, 1, tile, False, False,
                 clusters=clusters, EXCHANGE=exchange, times=times, TIMES=times is not None)  # fmt: skip


def timeline(x: torch.Tensor, p: dict, bias: torch.Tensor, tile: tuple) -> str:
    """Where the rank-0 cluster kernel's time goes, from its stamps (us, medians over CTAs after
    a memset; the launch's first start is 0): product end, the spread of product ends within a
    cluster (its last minus each CTA's own), the wait at the first barrier, the rest."""
    n = p["qweight"].shape[1]
    times = torch.zeros(triton.cdiv(n, tile[0]) * tile[1], 4, dtype=torch.int64, device=x.device)
    torch.empty(64 << 20, dtype=torch.uint8, device=x.device).zero_()
    rank0_layer(x, p, bias, tile, True, True, times)
    torch.cuda.synchronize()
    t = (times - times[:, 0].min()).double() / 1e3
    last = t[:, 1].view(-1, tile[1]).amax(1, keepdim=True)
    lag = (last - t[:, 1].view(-1, tile[1])).flatten()
    med = lambda v: v.median().item()  # noqa: E731
    return (f"product ends {med(t[:, 1]):.1f} (last {t[:, 1].max():.1f}), behind its cluster's last "
            f"{med(lag):.1f}, barrier wait {med(t[:, 2] - t[:, 1]):.1f}, rest {med(t[:, 3] - t[:, 2]):.1f}, "
            f"launch end {t[:, 3].max():.1f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="3072x3072,3072x9216,3072x12288,12288x3072")
    ap.add_argument("--tiles", default="64,8,4,3;128,4,4,3;128,8,4,4")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("diag_small_m_cluster needs a CUDA GPU")
    for k, n, _, x, (w, bias, _, p, _) in swept_layers(args.shapes, "16"):
        a = layer_args(x, p, bias)
        a0 = (*a[:5], *(t[:, :0].contiguous() for t in a[5:8]), *a[8:])
        ref = w4_linear_small_m(*a, scaled_codes=False)
        bf16 = bench(lambda: F.linear(x, w, bias.to(torch.bfloat16)))
        gluon = bench(lambda: w4_linear_small_m_gluon(*a))
        gluon0 = bench(lambda: w4_linear_small_m_gluon(*a0))
        print(f"{k}x{n}: bf16 {bf16:.1f} us; Gluon layer rank 32 {gluon:.1f} us ({bf16 / gluon:.2f}x), rank 0 "
              f"{gluon0:.1f} us", flush=True)  # fmt: skip
        pre = [
            f"cluster {c}: {bench(lambda: prepare(x, a[1], a[5], False, c, False)):.1f} / "
            f"{bench(lambda: prepare(x, a[1], a[5], True, c, False)):.1f}"
            for c in (8, 16)
        ]
        print("  pre-kernel alone, x @ l1 / and scaling, us: " + " | ".join(pre), flush=True)
        for tile in parse_tiles(args.tiles):
            cells = []
            for label, prescale in (("pre", True), ("in", False)):

                def layer() -> torch.Tensor:
                    return w4_linear_small_m_cluster(*a, tile=tile, prescale=prescale)

                err = _rel(layer(), ref)
                cells.append(f"{label} {bench(layer):.1f} ({err:.1e})")
            for label, clusters, exchange in (("exchange", True, True), ("no exchange", True, False),
                                              ("plain", False, False)):  # fmt: skip
                cells.append(
                    f"r0 {label} {bench(lambda: rank0_layer(x, p, bias.float(), tile, clusters, exchange)):.1f}"
                )
            print(f"  {tile}: " + " | ".join(cells), flush=True)
            print(f"    r0 exchange timeline, us: {timeline(x, p, bias.float(), tile)}", flush=True)


if __name__ == "__main__":
    main()
