"""A library function counted at its Python API that launches a Triton kernel (as Unsloth's
swiglu_fg_kernel does), metered under Triton's interpreter; run by test_triton_api_kernels.py in a
child process (TRITON_INTERPRET=1 must be set before Triton is imported). Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
import types
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flopcount  # noqa: E402


@triton.jit
def _fg_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    e = tl.load(e_ptr + offsets, mask=mask, other=0.0)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0)
    tl.store(h_ptr + offsets, e * tl.sigmoid(e) * g, mask=mask)


def swiglu_fg_kernel(e, g):
    h = torch.empty_like(e)
    n = e.numel()
    _fg_kernel[(triton.cdiv(n, 16),)](e, g, h, n, BLOCK=16)
    return h


def main() -> None:
    warnings.filterwarnings("ignore")
    for name in ("unsloth", "unsloth.kernels", "unsloth.kernels.swiglu"):
        sys.modules[name] = types.ModuleType(name)
    library = sys.modules["unsloth.kernels.swiglu"]
    _fg_kernel.fn.__module__ = swiglu_fg_kernel.__module__ = library.__name__
    library._fg_kernel, library.swiglu_fg_kernel = _fg_kernel, swiglu_fg_kernel
    e, g = torch.randn(5, 7), torch.randn(5, 7)
    with flopcount.meter(backend="dispatch", strict=True) as m:
        h = library.swiglu_fg_kernel(e, g)
        m.step()
    with flopcount.meter(backend="dispatch") as bare:  # the kernel launched outside the API
        out = torch.empty_like(e)
        _fg_kernel[(3,)](e, g, out, e.numel(), BLOCK=16)
        bare.step()
    print(json.dumps({"api": m.summary(), "bare": bare.summary(),
                      "close": bool(torch.allclose(h, torch.nn.functional.silu(e) * g, atol=1e-6))}))


if __name__ == "__main__":
    main()
