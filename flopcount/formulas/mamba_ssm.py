"""mamba-ssm's Triton SSD kernels (Mamba-2): ``mamba_chunk_scan_combined``, counted at its Python
API (integrations/kernels.py; its selective scan and causal-conv1d are in kernels_api.py).

Per batch, over chunks of c tokens (``chunk_size``), heads H of size P, state N, G groups of B/C:

- CB = C Bᵀ per chunk and group (``_bmm_chunk_fwd``, the full c x c block): 2·G·c²·N;
- chunk states Bᵀ (decay·dt·x) (``_chunk_state_fwd``): 2·H·c·N·P;
- state passing between chunks (``_state_passing_fwd``): decay and add, 2·H·N·P per chunk;
- output (``_chunk_scan_fwd``): the causal part (CB ∘ decay) x over c(c+1)/2 pairs, 2·H·pairs·P,
  and C · states, 2·H·c·N·P;
- per (token, head): dt bias (1) and softplus (``softplus``) when asked, dA = dt·A and its
  cumulative sum (2); per pair and head the decay exp(dA_i - dA_j)·dt_j (3); the D skip 2 per
  element of x, the z gate silu (5) + multiply (1) per element.

GEMM-like products are category ``matmul`` (tl.dot, as the einsum reference computes them). The
backward recomputes CB, the chunk states and the state passing (phase ``recompute``), then
computes twice the forward products and twice the vector work.
"""
from __future__ import annotations

from ..conventions import RECOMPUTE
from .constants import PER_ELEMENT
from .registry import Work


def ssd_chunk_scan(batch: int, length: int, heads: int, head_dim: int, state: int, groups: int, chunk_size: int,
                   *, has_d: bool, has_z: bool, dt_bias: bool, dt_softplus: bool) -> tuple[list[Work], list[Work]]:
    full, rest = divmod(length, chunk_size)
    cs = [chunk_size] * full + ([rest] if rest else [])
    n_chunks, pairs, squares = len(cs), sum(c * (c + 1) // 2 for c in cs), sum(c * c for c in cs)
    cb = 2 * groups * squares * state
    chunk_states = 2 * heads * length * state * head_dim
    passing = 2 * heads * n_chunks * state * head_dim
    scan = 2 * heads * pairs * head_dim + 2 * heads * length * state * head_dim
    x = length * heads * head_dim
    vector = (length * heads * (int(dt_bias) + PER_ELEMENT["softplus"].flops * bool(dt_softplus) + 2)
              + 3 * heads * pairs + 2 * x * has_d + (PER_ELEMENT["silu"].flops + 1) * x * has_z)
    b = batch
    forward = [Work("matmul", b * (cb + chunk_states + scan)), Work("pointwise", b * (passing + vector))]
    backward = [Work("matmul", 2 * b * (cb + chunk_states + scan)), Work("pointwise", 2 * b * (passing + vector)),
                Work("matmul", b * (cb + chunk_states), RECOMPUTE), Work("pointwise", b * passing, RECOMPUTE)]
    return forward, backward
