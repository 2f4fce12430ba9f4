"""Triton kernels under the interpreter, metered; run by test_triton_kernels.py in a child process.

TRITON_INTERPRET=1 must be set before Triton is first imported (its own @jit helpers such as
tl.sum are created then), so this runs in a fresh interpreter. Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import flopcount  # noqa: E402


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(y_ptr + row * n_cols + cols, x * rstd * w, mask=mask)


@triton.jit
def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, 2.0 * tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.heuristics({"BLOCK": lambda args: triton.next_power_of_2(args["n"])})
@triton.jit
def square_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, x * x, mask=mask)


@triton.jit
def cross_entropy_kernel(logits_ptr, targets_ptr, loss_ptr, n_classes, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_classes
    z = tl.load(logits_ptr + row * n_classes + cols, mask=mask, other=-float("inf"))
    z_max = tl.max(z, axis=0)
    log_sum = tl.log(tl.sum(tl.exp(z - z_max), axis=0))
    z_target = tl.load(logits_ptr + row * n_classes + tl.load(targets_ptr + row))
    tl.store(loss_ptr + row, log_sum + z_max - z_target)


@flopcount.register_formula(cross_entropy_kernel, category="pointwise")
def cross_entropy_kernel_flops(logits, targets, loss, n_classes, *, BLOCK=None, out_shape=None):
    rows, classes = logits
    # per logit: max compare, subtract, exp, add to the sum; per row: log, add, subtract
    return 4 * rows * classes + 3 * rows


@flopcount.register_formula(rms_norm_kernel, category="norm")
def rms_norm_kernel_flops(x, w, y, n_cols, eps, *, BLOCK=None, out_shape=None):
    return 4 * x[0] * x[1]  # per element: square, row-sum add, multiply by rstd, by the weight


@flopcount.register_formula(square_kernel, category="pointwise")  # through its heuristics wrapper
def square_kernel_flops(x, y, n, *, BLOCK=None, out_shape=None):
    return n


def rms_norm(x, w, eps=1e-6):
    y = torch.empty_like(x)
    rms_norm_kernel[(x.shape[0],)](x, w, y, x.shape[1], eps, BLOCK=triton.next_power_of_2(x.shape[1]))
    return y


def main(rows: int, cols: int, n: int) -> dict:
    result = {"kernel_types": sorted({type(k).__name__ for k in (rms_norm_kernel, double_kernel)})}
    x, w = torch.randn(rows, cols), torch.randn(cols)
    rms_norm(x, w)  # outside any meter: books nothing
    with flopcount.meter(backend="dispatch") as m:
        for _ in range(3):
            y = rms_norm(x, w)
    result["rms_norm_close"] = bool(torch.allclose(y, torch.nn.functional.rms_norm(x, (cols,), w, eps=1e-6),
                                                   atol=1e-5))
    result["rms_norm"] = m.summary()

    logits, targets = torch.randn(rows, cols), torch.randint(0, cols, (rows,))
    loss = torch.empty(rows)
    with flopcount.meter(backend="dispatch") as m:
        cross_entropy_kernel[(rows,)](logits, targets, loss, cols, BLOCK=triton.next_power_of_2(cols))
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    result["cross_entropy_close"] = bool(torch.allclose(loss, want, atol=1e-5))
    result["cross_entropy"] = m.summary()

    v = torch.randn(n)
    out = torch.empty_like(v)
    with flopcount.meter(backend="dispatch") as m:
        square_kernel[(1,)](v, out, n)
    result["square_close"] = bool(torch.allclose(out, v * v))
    result["square"] = m.summary()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with flopcount.meter(backend="dispatch") as m:
            for _ in range(2):
                double_kernel[(triton.cdiv(n, 16),)](v, out, n, BLOCK=16)
    result["double_close"] = bool(torch.allclose(out, 2 * v))
    result["double"] = m.summary()
    result["double_warnings"] = sum("double_kernel" in str(w.message) for w in caught)
    try:
        with flopcount.meter(backend="dispatch", strict=True):
            double_kernel[(triton.cdiv(n, 16),)](v, out, n, BLOCK=16)
        result["strict_error"] = None
    except flopcount.UncountedOpError as exc:
        result["strict_error"] = str(exc)
    result["names"] = {k: f"{f.fn.__module__}.{f.fn.__qualname__}"
                       for k, f in (("rms_norm", rms_norm_kernel), ("double", double_kernel),
                                    ("square", square_kernel.fn), ("cross_entropy", cross_entropy_kernel))}
    return result


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:4]))))
