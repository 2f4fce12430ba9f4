"""flash-linear-attention (``fla``) chunked kernels, counted at their Python API (Triton kernels
launched from autograd Functions; integrations/kernels.py wraps the public functions).

The chunked algorithm, per head, chunk of c tokens (chunk size 64; packed sequences by
``cu_seqlens`` are chunked per sequence), key size K, value size V, state S [K, V]:

- intra-chunk attention: scores Q Kᵀ and output A V over the c(c+1)/2 causal pairs:
  2·pairs·(K + V), the attention convention of SDPA;
- inter-chunk: output Q S (2·c·K·V) and the state update S += Kᵀ V (2·c·K·V);
- delta rule (``chunk_delta_rule``, ``chunk_gated_delta_rule``) adds the WY representation:
  (βK) Kᵀ over the strict lower pairs (2·K per pair), the inverse of the unit lower triangular
  c x c matrix (a triangular solve with c right-hand sides, linalg.py), w = T·βK and u = T·βV
  (2·c²·(K + V)), and v_new = u - w S (2·c·K·V);
- gates: scalar gates (``simple_gla``, ``gated_delta_rule``) a cumulative sum and exp per token
  (2) and a decay per pair (2); vector gates (``gla``) the same per key channel.

GEMM work is category ``attention`` (it is attention, linearised). Backward: twice the forward
GEMMs (two operand gradients each), the states recomputed (inter-chunk state update) in phase
``recompute``, twice the gate work. Heads are the value heads (grouped value attention: q/k heads
are shared, the work is per value head).
"""
from __future__ import annotations

from ..conventions import RECOMPUTE
from .linalg import triangular_solve_flops
from .registry import Work

CHUNK = 64


def chunks(lengths, chunk: int = CHUNK) -> list[int]:
    """Chunk lengths of every sequence (the last chunk of each may be short)."""
    out = []
    for n in lengths:
        full, rest = divmod(int(n), chunk)
        out += [chunk] * full + ([rest] if rest else [])
    return out


def chunked_linear_attention(lengths, heads: int, d_k: int, d_v: int, *, delta: bool, gate: str | None,
                             chunk: int = CHUNK) -> tuple[list[Work], list[Work]]:
    """(forward, backward) works; ``gate``: None, 'scalar' or 'vector'."""
    cs = chunks(lengths, chunk)
    tokens = sum(cs)
    pairs = sum(c * (c + 1) // 2 for c in cs)
    state = 2 * tokens * d_k * d_v  # one state product (Q S, Kᵀ V or w S) over every token
    gemm = 2 * pairs * (d_k + d_v) + 2 * state
    other = 0
    if delta:
        gemm += 2 * sum(c * (c - 1) // 2 for c in cs) * d_k + 2 * sum(c * c for c in cs) * (d_k + d_v) + state
        other = sum(triangular_solve_flops(1, c, c, unitriangular=True) for c in cs)
    width = {None: 0, "scalar": 1, "vector": d_k}[gate]
    gating = 2 * (tokens + pairs) * width
    forward = [Work("attention", heads * gemm)]
    backward = [Work("attention", 2 * heads * gemm), Work("attention", heads * state, RECOMPUTE)]
    if other:
        forward.append(Work("other", heads * other))
        backward.append(Work("other", 2 * heads * other))
    if gating:
        forward.append(Work("pointwise", heads * gating))
        backward.append(Work("pointwise", 2 * heads * gating))
    return forward, backward


def sequence_lengths(q_shape, cu_seqlens) -> list[int]:
    """[B, T, ...] without offsets: B sequences of T; with offsets, their differences."""
    if cu_seqlens is None:
        return [q_shape[1]] * q_shape[0]
    values = [int(x) for x in cu_seqlens.tolist()]
    return [b - a for a, b in zip(values[:-1], values[1:])]
