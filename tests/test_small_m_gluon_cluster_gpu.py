"""The cluster small-M layer (``studio/kernels/small_m_gluon_cluster.py``) vs its reference.

On a GPU (``pytest -m gpu``, sm_90): 1-16 rows, K from 5 to 192 groups, N off the column
block, ranks 0-160 (chunks of 32 with a part empty), clusters of 1-16 CTAs in the layer
(splits with short or empty runs of groups) and in the pre-kernel, rings deeper than a
split, activations scaled by the pre-kernel or in the column programs, with and without
dependent launch.  The oracle is ``reference_small_m`` with exact codes: the same bf16
roundings; what is left is fp32 summation order and the bf16 output rounding, so 5e-3
relative (Frobenius), as for the other small-M kernels.  The argument checks run on the
CPU too.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import small_m_case

from studio.kernels.reference_small_m import w4_linear_small_m
from studio.kernels.small_m_gluon_cluster import cluster_misfit, cluster_tile, w4_linear_small_m_cluster

CASES = [
    # (M, K, N, R, tile (BLOCK_N, SPLIT_K = cluster, warps, stages), pre-kernel cluster)
    (1, 320, 72, 16, (64, 1, 4, 2), 1),
    (7, 704, 136, 48, (64, 4, 4, 3), 4),  # 11 groups over 4 splits; 48 ranks: a chunk half empty
    (16, 3072, 200, 32, (128, 8, 4, 4), 8),
    (12, 704, 256, 96, (256, 4, 8, 6), 2),  # a ring deeper than a split's 3 groups
    (16, 3072, 3072, 160, (64, 8, 4, 3), 16),
    (16, 12288, 192, 0, (128, 16, 4, 4), 16),
    (5, 1024, 520, 64, (128, 2, 8, 4), 5),
    (16, 12288, 3072, 32, (128, 8, 4, 4), 16),
    (3, 448, 96, 32, (64, 8, 4, 2), 3),  # 7 groups over 8 splits: one run empty
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("prescale", [False, True])
@pytest.mark.parametrize("m,k,n,r,tile,la_cluster", CASES)
def test_cluster_layer_matches_reference(
    m: int, k: int, n: int, r: int, tile: tuple, la_cluster: int, prescale: bool
) -> None:
    """Within the stated tolerance, and identical run to run (no atomics anywhere)."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n + r, device="cuda")
    expect = w4_linear_small_m(*args, scaled_codes=False)
    kw = dict(tile=tile, prescale=prescale, la_cluster=la_cluster)
    out = w4_linear_small_m_cluster(*args, **kw)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert torch.isfinite(out).all() and _rel(out, expect) < 5e-3, kw
    assert torch.equal(out, w4_linear_small_m_cluster(*args, **kw)), kw


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,r,tile,la_cluster", [CASES[i] for i in (1, 2, 4, 7)])
def test_cluster_layer_dependent_launch_matches_the_plain_one(
    m: int, k: int, n: int, r: int, tile: tuple, la_cluster: int
) -> None:
    """Launched while its pre-kernel runs: the same bits as launched after it, twice in a row
    and in a CUDA graph after a kernel that writes the activations (as ``bench_w4`` times it)."""
    args = small_m_case(m, k, n, r, "int4", seed=m + k + n, device="cuda")
    kw = dict(tile=tile, prescale=True, la_cluster=la_cluster)
    plain = w4_linear_small_m_cluster(*args, dependent_launch=False, **kw)
    runs = [w4_linear_small_m_cluster(*args, **kw) for _ in range(2)]
    x = args[0]
    x_in = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        x.copy_(x_in * 1.0)  # (a kernel that writes x right before the layer reads it)
        captured = w4_linear_small_m_cluster(*args, **kw)
    x.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for out in (*runs, captured):
        assert torch.equal(out, plain), kw


@pytest.mark.gpu
def test_cluster_layer_at_its_default_tile_without_bias() -> None:
    args = list(small_m_case(9, 3072, 3072, 32, "int4", seed=3, device="cuda"))
    args[-1] = None
    out = w4_linear_small_m_cluster(*args)
    assert _rel(out, w4_linear_small_m(*args, scaled_codes=False)) < 5e-3


@pytest.mark.parametrize(
    "m,tile,need",
    [
        (17, (64, 4, 4, 3), "1-16 rows"),
        (16, (64, 32, 4, 3), "a split of 1-16"),
        (16, (96, 4, 4, 3), "BLOCK_N a multiple"),
        (16, (64, 8, 8, 3), "BLOCK_N a multiple"),
        (16, (64, 4, 4, 1), "at least 2 ring slots"),
    ],
)
def test_cluster_misfit_names_what_is_missing(m: int, tile: tuple, need: str) -> None:
    assert need in cluster_misfit(m, tile)
    assert cluster_misfit(16, (64, 8, 4, 3)) == ""


def test_cluster_tile_splits_k_and_keeps_whole_clusters() -> None:
    for kg, n in [(48, 3072), (48, 9216), (48, 12288), (192, 3072), (5, 200), (7, 96), (13, 64), (1, 64)]:
        block_n, split, warps, stages, _ = cluster_tile(kg, n)
        assert cluster_misfit(16, (block_n, split, warps, stages)) == ""
        assert split <= max(1, kg // 2)


def test_cluster_layer_refuses_a_cpu_tensor() -> None:
    """On the CPU (no sm_80 GPU) the launcher names what is missing before it launches anything."""
    with pytest.raises(ValueError, match="CUDA GPU"):
        w4_linear_small_m_cluster(*small_m_case(4, 448, 96, 32, "int4"))


@pytest.mark.gpu
def test_cluster_layer_refuses_a_tile_or_pre_kernel_cluster_it_cannot_take() -> None:
    args = small_m_case(4, 448, 96, 32, "int4", device="cuda")
    with pytest.raises(ValueError, match="BLOCK_N a multiple"):
        w4_linear_small_m_cluster(*args, tile=(96, 4, 4, 3))
    with pytest.raises(ValueError, match="pre-kernel cluster of 1-16"):
        w4_linear_small_m_cluster(*args, la_cluster=17)


def test_launch_in_clusters_refuses_partial_clusters_or_a_mismatched_size() -> None:
    from studio.kernels.cluster_launch import launch_in_clusters
    from studio.kernels.small_m_gluon_cluster import _w4_cluster_layer_kernel

    with pytest.raises(ValueError, match="must be the cluster size 4"):
        launch_in_clusters(_w4_cluster_layer_kernel, 8, 4, "SPLIT_K", SPLIT_K=2)
    with pytest.raises(ValueError, match="whole clusters"):
        launch_in_clusters(_w4_cluster_layer_kernel, 10, 4, "SPLIT_K", SPLIT_K=4)
    with pytest.raises(ValueError, match="whole clusters"):
        launch_in_clusters(_w4_cluster_layer_kernel, 32, 32, "SPLIT_K", SPLIT_K=32)
