"""The table of per-element FLOP constants: the single place where vector-work costs are set.

Convention (docs/conventions.md): one FLOP per arithmetic operation, comparison or elementary
function evaluation in the op's defining formula, per element. GEMM-like work (matmul,
attention, conv) is not here: it is 2 FLOP per multiply-add, computed from shapes.

Each row says which elements are counted:
- ``output``: elements of the result (for in-place ops, of the mutated tensor; for ``_foreach_*``,
  summed over the list);
- ``input``: elements of the first input (reductions, which read many and write few);
- ``source``: elements of the scattered or accumulated source tensor;
- ``target``: elements of the target tensor (losses indexed by class);
- ``formula``: a constant that a dedicated formula uses (norms, fused attention, optimizers).

``python -m flopcount.formulas.constants`` prints the table as Markdown; with ``--update FILE`` it
rewrites the table between the constants markers in FILE (docs/conventions.md; a test checks
that the copy there agrees with this file).
"""
from __future__ import annotations

from typing import NamedTuple


class PerElement(NamedTuple):
    flops: int
    category: str
    counts: str
    why: str


def _rows(names: str, flops: int, category: str, counts: str, why: str) -> dict[str, PerElement]:
    return {name: PerElement(flops, category, counts, why) for name in names.split()}


def _table(*groups: dict[str, PerElement]) -> dict[str, PerElement]:
    """The rows merged; an op named in two rows is an error (a dict literal would keep the later one silently)."""
    table: dict[str, PerElement] = {}
    for group in groups:
        for name, row in group.items():
            if name in table:
                raise ValueError(f"flopcount: per-element constant for {name!r} is set twice in formulas/constants.py")
            table[name] = row
    return table


PER_ELEMENT: dict[str, PerElement] = _table(
    # Elementwise arithmetic, comparisons and elementary functions: one operation each.
    _rows("add sub", 1, "pointwise", "output", "one add; a + alpha*b with alpha != 1 counts 2 (scale, add)"),
    _rows("rsub mul div neg abs reciprocal maximum minimum fmod remainder floor_divide "
            "sign sgn floor ceil round trunc frac square pow exp exp2 expm1 log log2 log10 log1p "
            "sqrt rsqrt sin cos tan tanh atan atan2 erf erfc erfinv", 1, "pointwise", "output",
            "one arithmetic operation or elementary function"),
    _rows("eq ne lt le gt ge isnan isinf isfinite clamp clamp_min clamp_max", 1, "pointwise", "output",
            "one comparison (clamp: a bounded comparison)"),
    _rows("nan_to_num", 3, "pointwise", "output", "three comparisons (NaN, +inf, -inf), each a select"),
    _rows("addcmul addcdiv lerp", 3, "pointwise", "output",
            "self + value*(t1 op t2) / a + w*(b-a): three operations"),
    # Activations and their gradients (x = input, s = sigmoid(x), g = upstream gradient).
    _rows("relu", 1, "pointwise", "output", "max(x, 0)"),
    _rows("hardtanh threshold", 1, "pointwise", "output", "one bounded comparison"),
    _rows("leaky_relu", 2, "pointwise", "output", "compare, scale"),
    _rows("sigmoid", 4, "pointwise", "output", "1/(1+exp(-x)): neg, exp, add, div"),
    _rows("silu", 5, "pointwise", "output", "x*sigmoid(x): sigmoid (4) + mul"),
    _rows("gelu", 5, "pointwise", "output",
            "0.5*x*(1+erf(x/sqrt2)): div, erf, add, mul, mul (tanh approximation: gelu_tanh)"),
    _rows("gelu_tanh", 9, "pointwise", "formula",
            "0.5x(1+tanh(c(x+0.044715x^3))): cube (2), mul, add, mul, tanh, add, mul, mul"),
    _rows("elu celu selu", 4, "pointwise", "output", "compare, exp, sub, scale"),
    _rows("softplus", 3, "pointwise", "output", "log(1+exp(x)): exp, add, log"),
    _rows("mish", 5, "pointwise", "output", "x*tanh(softplus(x)): exp, add, log, tanh, mul"),
    _rows("hardswish", 4, "pointwise", "output", "x*clamp(x+3,0,6)/6: add, clamp, mul, div"),
    _rows("hardsigmoid", 3, "pointwise", "output", "clamp(x+3,0,6)/6: add, clamp, div"),
    _rows("glu", 5, "pointwise", "output", "a*sigmoid(b): sigmoid (4) + mul, per output element"),
    _rows("threshold_backward hardtanh_backward", 1, "pointwise", "output", "g masked by one comparison"),
    _rows("leaky_relu_backward", 2, "pointwise", "output", "compare, scale"),
    _rows("tanh_backward sigmoid_backward", 3, "pointwise", "output", "g*(1-y^2) / g*y*(1-y)"),
    _rows("silu_backward", 9, "pointwise", "output", "g*s*(1+x*(1-s)): sigmoid (4), sub, mul, add, mul, mul"),
    _rows("gelu_backward", 11, "pointwise", "output",
            "g*(Phi(x)+x*phi(x)): Phi (4), phi = c*exp(-x^2/2) (4), mul, add, mul"),
    _rows("gelu_tanh_backward", 17, "pointwise", "formula",
            "derivative of the tanh approximation: inner polynomial (4), tanh, 1-t^2 (2), products and sums (9), mul g"),
    _rows("elu_backward softplus_backward", 4, "pointwise", "output", "compare/exp, add, div or scale, mul g"),
    _rows("hardswish_backward hardsigmoid_backward", 3, "pointwise", "output", "two comparisons, mul g"),
    _rows("log_sigmoid log_sigmoid_forward", 5, "pointwise", "output",
            "min(x, 0) - log1p(exp(-|x|)): abs, exp, log1p, min, subtract"),
    _rows("log_sigmoid_backward", 5, "pointwise", "output", "g*sigmoid(-x): sigmoid (4), mul g"),
    _rows("polar", 4, "pointwise", "output", "abs*cos(angle) + i*abs*sin(angle): cos, sin, two multiplies"),
    # Softmax family (per element of the softmax input).
    _rows("_softmax _safe_softmax _log_softmax", 5, "pointwise", "output",
            "row max, subtract, exp, row sum, divide (log_softmax: subtract log-sum)"),
    _rows("_softmax_backward_data", 4, "pointwise", "output", "y*g, row sum, subtract, multiply by y"),
    _rows("_log_softmax_backward_data", 4, "pointwise", "output", "row sum of g, exp(y), multiply, subtract"),
    # Dropout: random bits are not arithmetic; compare with p and rescale.
    _rows("native_dropout native_dropout_backward", 2, "pointwise", "output", "mask (compare) and scale"),
    # Reductions: one operation per element read.
    _rows("sum mean prod amax amin max min argmax argmin aminmax all any cumsum cumprod "
            "topk sort msort argsort histc bincount count_nonzero nansum", 1, "reduction", "input",
            "one add/multiply/comparison per element read (sorts: a lower bound)"),
    _rows("var std var_mean std_mean", 4, "reduction", "input", "mean pass (1), subtract, square, sum"),
    _rows("norm linalg_vector_norm", 2, "reduction", "input", "square (abs) and sum"),
    _rows("logsumexp", 4, "reduction", "input", "max, subtract, exp, sum"),
    # Losses (cross-entropy = _log_softmax + nll_loss; the softmax part is counted above).
    _rows("nll_loss_forward nll_loss2d_forward nll_loss_backward nll_loss2d_backward", 1,
            "reduction", "target", "gather/scatter one log-probability per target and sum"),
    _rows("mse_loss", 3, "reduction", "input", "subtract, square, sum"),
    _rows("mse_loss_backward", 2, "pointwise", "input", "subtract, scale"),
    _rows("binary_cross_entropy_with_logits", 7, "reduction", "input",
            "log-sigmoid (4), weighted combination (2), sum"),
    # Accumulating scatters: one add per source element.
    _rows("index_add scatter_add scatter_reduce embedding_dense_backward", 1, "pointwise", "source",
            "one add per accumulated element"),
    _rows("index_put_accumulate", 1, "pointwise", "formula",
            "index_put with accumulate=True: one add per value (without accumulate: a copy, zero)"),
    # Normalisation (per input element; weight/bias gradients per input element as well).
    _rows("layer_norm_forward", 5, "norm", "formula",
            "mean (1), subtract, square, sum, multiply by rstd; over the normalised elements"),
    _rows("norm_affine", 2, "norm", "formula", "multiply by weight, add bias (1 each when present)"),
    _rows("layer_norm_backward_input", 10, "norm", "formula",
            "x_hat (2), g*w, g*w*x_hat, two row sums, two subtracts, product, scale by rstd"),
    _rows("norm_backward_weight", 2, "norm", "formula", "g*x_hat and sum"),
    _rows("norm_backward_bias", 1, "norm", "formula", "sum of g"),
    _rows("rms_norm_forward", 3, "norm", "formula", "square, sum, multiply by rstd"),
    _rows("rms_norm_backward_input", 7, "norm", "formula",
            "x_hat, g*w, g*w*x_hat, row sum, x_hat*mean, subtract, scale by rstd"),
    _rows("batch_norm_eval", 2, "norm", "formula", "subtract running mean, multiply by running rstd"),
    # Fused attention softmax, per (query, key) pair and query head.
    _rows("attention_softmax_forward", 5, "pointwise", "formula", "as _softmax, computed online"),
    _rows("attention_softmax_backward", 4, "pointwise", "formula", "as _softmax_backward_data"),
    _rows("attention_softcap", 3, "pointwise", "formula", "cap * tanh(score / cap): divide, tanh, multiply"),
    _rows("attention_softcap_backward", 3, "pointwise", "formula", "g * (1 - t^2): square, subtract, multiply"),
    # Optimizers (per parameter element).
    _rows("adam_step", 16, "pointwise", "formula",
            "decay (2), m update (3), v update (4), two bias corrections, sqrt, add eps, divide, lr scale, subtract"),
    _rows("adam_amsgrad", 1, "pointwise", "formula", "max(v_max, v)"),
    _rows("sgd_step", 2, "pointwise", "formula", "lr scale, subtract"),
    _rows("sgd_weight_decay sgd_momentum sgd_nesterov", 2, "pointwise", "formula", "one multiply-add each"),
    _rows("adagrad_step", 6, "pointwise", "formula", "decay, g^2 accumulate (2), sqrt, add eps, divide-and-step"),
    _rows("rmsprop_step", 9, "pointwise", "formula",
            "g^2, v decay, (1-a) g^2, add, sqrt, add eps, divide, lr scale, subtract"),
    _rows("lion_step", 11, "pointwise", "formula",
            "decay (2), interpolate m and g (3), sign, lr scale, subtract, m update (3)"),
    _rows("ademamix_extra", 5, "pointwise", "formula",
            "AdEMAMix on top of adam_step: slow momentum update (3), scale by alpha, add"),
    _rows("trust_ratio", 3, "pointwise", "formula",
            "LAMB/LARS update-norm clipping: square, sum, rescale"),
    _rows("grad_scale", 1, "pointwise", "formula", "gradient multiplied by a norm scale != 1"),
    # State-space scans (mamba-ssm's selective scan, counted at its API; docs/custom_kernels.md).
    _rows("selective_scan_step", 9, "other", "formula",
            "per (batch, channel, position, state): delta*A, exp, delta*B*u (2), h = dA*h + dBu (2), C*h and sum (2)"),
    _rows("selective_scan_backward", 18, "other", "formula",
            "twice the forward step: gradients of the recurrence flow to h, delta, A, B, C and u"),
    # Quantization (bitsandbytes; docs/custom_kernels.md). Code lookups are indexing (zero).
    _rows("dequantize_blockwise dequantize_4bit", 1, "pointwise", "formula",
            "code lookup (indexing) and one multiply by the block's absmax, per dequantized element"),
    _rows("quantize_4bit", 6, "pointwise", "formula",
            "block absmax (1), divide (1), nearest of 16 code values (4 comparisons)"),
    _rows("quantize_blockwise", 10, "pointwise", "formula",
            "block absmax (1), divide (1), nearest of 256 code values (8 comparisons)"),
    _rows("optimizer_8bit_state", 11, "pointwise", "formula",
            "per 8-bit optimizer state element: dequantize (1) and requantize (10, as quantize_blockwise)"),
    _rows("int8_vectorwise_quant", 3, "pointwise", "formula", "row absmax, scale, round (+1 outlier comparison with a threshold)"),
    _rows("int8_double_quant", 6, "pointwise", "formula", "row and column absmax (2), two scale-and-round (4)"),
    _rows("int8_vectorwise_dequant", 2, "pointwise", "formula", "multiply by the row statistic, divide by 127"),
    _rows("int8_mm_dequant", 3, "pointwise", "formula",
            "int32 product times row statistic, column statistic and 1/127^2 (+1 for a bias)"),
)


def markdown_table() -> str:
    lines = ["| name | FLOP per element | category | elements counted | derivation |",
             "|---|---:|---|---|---|"]
    for name, row in PER_ELEMENT.items():
        lines.append(f"| `{name}` | {row.flops} | {row.category} | {row.counts} | {row.why} |")
    return "\n".join(lines)


BEGIN, END = "<!-- constants:begin -->", "<!-- constants:end -->"


def update_docs(path: str) -> None:
    with open(path) as f:
        text = f.read()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_docs(sys.argv[2])
    else:
        print(markdown_table())
