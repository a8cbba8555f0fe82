"""Flagged split-K partials: each fp32 value and its launch's epoch in one 64-bit word.

The 16-row Gluon layer (``small_m_gluon_layer``) finishes each column block in its last
column program.  With counters, the others store their partials, fence them, count
themselves, and the finisher reads the count and then the partials: after the block's last
product that is about four dependent L2 round trips, about 1 us each while the launch
streams weights (``docs/results.md``, eighteenth session).  Here a partial carries its own
arrival, as NCCL's low-latency protocol does: each value is stored together with a flag in
one aligned 64-bit word (``st.relaxed.gpu``), which a reader sees whole or not at all, so no
fence and no counter are needed.  The finisher re-reads the words (volatile) until every
flag is this launch's; its first read is also the read of the data.

The flag is an epoch: ``epoch + 1``, where ``epoch`` is the number of launches of the layer
shape so far (``flagged_scratch`` keeps one per column block, and each block's finisher
moves its own on by one at its end, so all are equal when a launch starts).  Stale words
from earlier launches carry smaller epochs, so nothing has to be cleared between launches,
and a CUDA graph replays correctly (the epoch lives in device memory, not in the launch's
arguments).  The words of one scratch must always map to the same column blocks: it is
keyed by the layer's N and BLOCK_N.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def flagged_scratch(
    device: torch.device, n: int, block_n: int, words: int, blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This stream's zeroed int64 words (``>= words``) and int32 epochs (``>= blocks``) for
    layers of ``n`` outputs in blocks of ``block_n``.  Grown buffers start again from zero,
    words and epochs together (every word's epoch then is at most every block's)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, n, block_n)
    have = _SCRATCH.get(key)
    if have is None or have[0].numel() < words or have[1].numel() < blocks:
        have = (
            torch.zeros(max(words, 1 << 12), device=device, dtype=torch.int64),
            torch.zeros(max(blocks, 64), device=device, dtype=torch.int32),
        )
        _SCRATCH[key] = have
    return have


@gluon.jit
def _store_flagged(ptrs, vals, mask, flag):
    """fp32 ``vals`` at ``ptrs`` (int64 words), each with ``flag`` in its high half: one
    relaxed 64-bit store per value (no fence: the word is its own arrival)."""
    words = vals.to(gl.uint32, bitcast=True).to(gl.int64) | (flag.to(gl.int64) << 32)  # (zero-extended)
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $3, 0; @p st.relaxed.gpu.global.b64 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,l,r",
        [ptrs.to(gl.int64), words, mask.to(gl.int32)],
        dtype=gl.int32,
        is_pure=False,
        pack=1,
    )


@gluon.jit
def _flagged_sum(base, offs, mask, split_stride, SPLITS: gl.constexpr, flag, layout: gl.constexpr):
    """The sum over ``SPLITS`` splits (split ``s`` at ``base + s * split_stride + offs``) of
    flagged words, in split order, and whether every flag read was ``flag`` (a scalar).
    Unrolled, so that every split's read is in flight at once; masked values count as
    arrived zeros."""
    total = gl.zeros(offs.shape, gl.float32, layout)
    missing = gl.zeros(offs.shape, gl.int32, layout)
    idle = flag.to(gl.int64) << 32
    for s in gl.static_range(SPLITS):
        w = gl.load(base + s * split_stride + offs, mask=mask, other=idle, volatile=True)
        missing += ((w >> 32).to(gl.int32) != flag).to(gl.int32)
        total += w.to(gl.int32).to(gl.float32, bitcast=True)
    return total, gl.max(gl.max(missing, axis=1), axis=0) == 0
