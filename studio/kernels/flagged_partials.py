"""Flagged split-K partials: each fp32 value carries its launch's parity in its lowest bit.

The 16-row Gluon layer (``small_m_gluon_layer``) finishes each column block in its last
column program.  With counters, the others store their partials, fence them, count
themselves, and the finisher reads the count and then the partials: after the block's last
product that is about four dependent L2 round trips, about 1 us each while the launch
streams weights (``docs/results.md``, eighteenth session).  Here a partial carries its own
arrival, as NCCL's low-latency protocol does with a flag beside each value: the value's
lowest mantissa bit is the launch's parity, and a 32-bit word is read whole or not at all,
so the writers need no fence and no counter.  The finisher re-reads the words (volatile,
each read after a ``fence.acq_rel.gpu``, without which words already written took several
microseconds more to be seen) until every parity is this launch's; its first read is also
the read of the data.

Measured on H100 (``bench/diag_small_m_flagged.py``, ``docs/results.md``, twenty-first
session): slower than the counting finish on every FLUX shape.  The words reached the
finisher 2-6 us after their writers were done, where the counter's release and acquire
took about 1 us; so ``w4_linear`` does not route here (``finish="flag"`` asks for it).  A flag beside
the value (64-bit words) was measured first: the finisher's reads then held twice the
registers, the kernel ran at 250-255 registers a thread and fewer programs fit on an SM.

The cost in accuracy: the finisher reads every partial with that bit cleared (at most one
fp32 unit in the last place, 2^-23 relative, against bf16's 2^-8 output rounding), so that
results do not depend on the parity and are identical launch to launch.  An infinite
partial reads as NaN.

The parity is that of ``epoch + 1``, where ``epoch`` counts the launches of the layer so far
(``flagged_scratch`` keeps one per column block; each block's finisher moves its own on by
one at its end, so all are equal when a launch starts).  It lives in device memory, not in
the launch's arguments, so a CUDA graph replays correctly.  One bit tells this launch's
words from the last launch's only if no word read is older: so every launch writes every
word that any launch of its scratch reads (all 16 rows, whatever its rows), and the scratch
is keyed by everything that places the words (N, BLOCK_N, SPLIT_K, the rank).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def one_wave_registers(device: torch.device, programs: int, warps: int) -> int | None:
    """The most registers a thread may take so that ``programs`` CTAs of ``warps`` warps are
    all resident at once on ``device`` (64 K registers an SM; None: no cap below 255 needed).
    A finish that waits for its block's other programs wastes its SM while they are not yet
    running: the flagged finish's reads held enough registers (up to 255 a thread before its
    words were laid out block by block) to push the last programs into a second wave."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per_sm = -(-programs // sms)
    cap = (65536 // (per_sm * 32 * warps)) // 8 * 8
    return cap if cap < 255 else None


def flagged_scratch(
    device: torch.device, place: tuple, words: int, blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This stream's int32 words (``words``) and epochs (``blocks``) for launches whose words
    are placed by ``place`` (everything that decides where a word goes), zeroed when made."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, *place)
    if key not in _SCRATCH:
        _SCRATCH[key] = (
            torch.zeros(max(words, 1), device=device, dtype=torch.int32),
            torch.zeros(blocks, device=device, dtype=torch.int32),
        )
    return _SCRATCH[key]


@gluon.jit
def _store_flagged(ptrs, vals, mask, flag):
    """fp32 ``vals`` at ``ptrs`` (int32 words), each with its lowest bit set to ``flag``'s
    parity: one relaxed 32-bit store per value (no fence: the word is its own arrival;
    plain vector stores measured no faster)."""
    words = (vals.to(gl.int32, bitcast=True) & -2) | (flag & 1)
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $3, 0; @p st.relaxed.gpu.global.b32 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r",
        [ptrs.to(gl.int64), words, mask.to(gl.int32)],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _flagged_sum(base, offs, mask, split_stride, SPLITS: gl.constexpr, flag, layout: gl.constexpr):
    """The sum over ``SPLITS`` splits (split ``s`` at ``base + s * split_stride + offs``) of
    flagged words, each with its parity bit cleared, in split order, and whether every
    parity read was ``flag``'s (a scalar).  Unrolled, so that every split's read is in flight
    at once; masked values count as arrived zeros."""
    total = gl.zeros(offs.shape, gl.float32, layout)
    missing = gl.zeros(offs.shape, gl.int32, layout)
    parity = flag & 1
    for s in gl.static_range(SPLITS):
        w = gl.load(base + s * split_stride + offs, mask=mask, other=parity, volatile=True)
        missing += ((w & 1) != parity).to(gl.int32)
        total += (w & -2).to(gl.float32, bitcast=True)
    return total, gl.max(gl.max(missing, axis=1), axis=0) == 0
