"""Launch a Triton / Gluon kernel in thread-block clusters (sm_90), without compiling it for them.

Triton launches clusters only for kernels compiled with ``num_ctas > 1``, and then every
layout of a Gluon kernel must say how the cluster's CTAs split each tensor.  The kernels in
``small_m_gluon_cluster`` need none of that: each CTA holds its own tensors, and they meet
only through distributed shared memory, in inline PTX.  So they are compiled as one CTA and
launched with a cluster dimension: Triton's launcher takes the cluster size from the compiled
kernel's packed metadata (``(num_warps, num_ctas, shared)``, used as ``gridDimX = grid[0] *
num_ctas`` and the cluster dimension), and ``launch_in_clusters`` sets it there.  Written by
hand because Triton has no launch option for it.  ``gl.program_id(0)`` is then the CTA's
index in the whole grid, and CTAs ``c * cluster .. (c + 1) * cluster - 1`` form cluster ``c``.
"""

from __future__ import annotations

from triton.runtime.jit import JITFunction

#: The largest cluster H100 runs (16 needs the non-portable size, which Triton's launcher sets).
MAX_CLUSTER = 16


def launch_in_clusters(
    kernel: JITFunction, ctas: int, cluster: int, cluster_arg: str, *args: object, **kwargs: object
) -> None:
    """``kernel`` over ``ctas`` CTAs (a multiple of ``cluster``) in clusters of ``cluster``.
    ``kwargs[cluster_arg]`` must be ``cluster``: a constexpr of the kernel, so that a compiled
    kernel is only ever launched at one cluster size (its packed metadata carries it)."""
    if kwargs.get(cluster_arg) != cluster:
        raise ValueError(f"{cluster_arg} must be the cluster size {cluster}, got {kwargs.get(cluster_arg)}")
    if not 1 <= cluster <= MAX_CLUSTER or ctas % cluster:
        raise ValueError(f"{ctas} CTAs do not make whole clusters of {cluster} (1-{MAX_CLUSTER})")
    grid = (ctas // cluster,)
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    if compiled is not None:  # (None where the launches are caught, not run: ``hopper_compile``)
        warps, _, shared = compiled.packed_metadata
        compiled.packed_metadata = (warps, cluster, shared)
    kernel[grid](*args, **kwargs)
