"""Counting at the Python API where kernels bypass the dispatcher (docs/custom_kernels.md).

Transformer Engine, mamba-ssm, causal-conv1d call C++/CUDA through pybind: no aten op, no
RecordFunction event. Liger's Triton kernels have no formula. Their work is booked where their
Python API runs, with the formulas of formulas/kernels_api.py:

- modules (Transformer Engine ``Linear``, ``LayerNormLinear``, ``LayerNormMLP``,
  ``DotProductAttention``): the forward is booked when the module returns, in the phase and under
  the name of the module (the meter's module hooks see it); the backward is booked by a hook on
  the output's autograd node, when autograd runs it (phase backward, the module's backward);
- functions (``selective_scan_fn``, ``causal_conv1d_fn``, Liger's autograd Functions): every
  module-global binding of the function in ``sys.modules`` is replaced by a counting wrapper while
  a meter is active, and restored when the last one exits; the backward likewise by a hook on the
  output's node.

Only libraries already imported when the meter starts are counted: their functions wrapped,
their modules watched (import them first: the model's imports usually do; a module of a library
imported later is reported as a dark module). Without them the meter adds no module hook for
them: the watch would run in every module call. The classes counted here are not dark modules (capture/dark.py).
"""
from __future__ import annotations

import functools
import sys
import threading

import torch

from ..capture import dark
from ..capture.active import HOOKS
from ..capture.triton import counted_at_api, enter_api, leave_api
from ..formulas import fla, mamba_ssm, unsloth
from ..formulas import kernels_api as api

_LOCK = threading.Lock()


def _tensor(x):
    return x if isinstance(x, torch.Tensor) else None


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


# ---- Transformer Engine modules -------------------------------------------------------------------

def _te_rms(module) -> bool:
    return str(getattr(module, "normalization", "LayerNorm")) == "RMSNorm"


def te_linear(module, args, kwargs, output):
    x = args[0] if args else kwargs.get("inp")
    return api.linear_works(api.tokens_of(x.shape, module.in_features), module.in_features, module.out_features,
                            bias=bool(getattr(module, "use_bias", False)), input_grad=x.requires_grad,
                            weight_grad=any(p.requires_grad for p in module.parameters()))


def te_layernorm_linear(module, args, kwargs, output):
    x = args[0] if args else kwargs.get("inp")
    tokens = api.tokens_of(x.shape, module.in_features)
    norm_f, norm_b = api.norm_works(tokens, module.in_features, rms=_te_rms(module))
    lin_f, lin_b = api.linear_works(tokens, module.in_features, module.out_features,
                                    bias=bool(getattr(module, "use_bias", False)),
                                    weight_grad=any(p.requires_grad for p in module.parameters()))
    return norm_f + lin_f, norm_b + lin_b


def te_layernorm_mlp(module, args, kwargs, output):
    x = args[0] if args else kwargs.get("inp")
    hidden = module.layer_norm_weight.shape[0] if hasattr(module, "layer_norm_weight") else x.shape[-1]
    return api.te_layernorm_mlp(api.tokens_of(x.shape, hidden), hidden, module.size_per_partition
                                if hasattr(module, "size_per_partition") else module.ffn_hidden_size,
                                activation=str(getattr(module, "activation", "gelu")), rms=_te_rms(module),
                                bias=bool(getattr(module, "use_bias", False)))


def te_dot_product_attention(module, args, kwargs, output):
    q, k, v = (args + (None,) * 3)[:3] if len(args) >= 3 else (kwargs.get("query_layer"), kwargs.get("key_layer"),
                                                                kwargs.get("value_layer"))
    layout = kwargs.get("qkv_format") or getattr(module, "qkv_format", "sbhd")
    mask = str(kwargs.get("attn_mask_type") or getattr(module, "attn_mask_type", "causal"))
    if layout == "bshd":
        batch, sq, heads, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[1]
    else:  # sbhd
        sq, batch, heads, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[0]
    return api.te_attention(batch, heads, sq, sk, q.shape[-1], v.shape[-1], causal="causal" in mask)


# (root package, class name) -> formula(module, args, kwargs, output) -> (forward, backward works)
MODULES = {
    ("transformer_engine", "Linear"): te_linear,
    ("transformer_engine", "LayerNormLinear"): te_layernorm_linear,
    ("transformer_engine", "LayerNormMLP"): te_layernorm_mlp,
    ("transformer_engine", "DotProductAttention"): te_dot_product_attention,
}
MODULE_ROOTS = frozenset(root for root, _ in MODULES)


# ---- functions ----------------------------------------------------------------------------------

def selective_scan_fn(args, kwargs, output):
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")
    b = {**dict(zip(names, args)), **kwargs}
    u, a = b["u"], b["A"]
    return api.selective_scan(u.shape[0], u.shape[1], u.shape[-1], a.shape[-1], has_d=b.get("D") is not None,
                              has_z=b.get("z") is not None, delta_bias=b.get("delta_bias") is not None,
                              delta_softplus=bool(b.get("delta_softplus")))


def causal_conv1d_fn(args, kwargs, output):
    names = ("x", "weight", "bias", "seq_idx", "initial_states", "return_final_states", "final_states_out",
             "activation")
    b = {**dict(zip(names, args)), **kwargs}
    x, w = b["x"], b["weight"]
    return api.causal_conv1d(x.shape[0], x.shape[1], x.shape[-1], w.shape[-1], bias=b.get("bias") is not None,
                             activation=b.get("activation") in ("silu", "swish"), input_grad=x.requires_grad,
                             weight_grad=w.requires_grad)


def liger_rms_norm(args, kwargs, output):
    x, w = args[0], args[1]
    return api.liger_rms_norm(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1])


def liger_layer_norm(args, kwargs, output):
    x = args[0]
    return api.liger_layer_norm(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1])


def liger_swiglu(args, kwargs, output):
    return api.liger_glu(args[0].numel(), "silu")


def liger_geglu(args, kwargs, output):
    return api.liger_glu(args[0].numel(), "gelu")


def liger_rope(args, kwargs, output):
    return api.liger_rope(args[0].numel(), args[1].numel())


def liger_cross_entropy(args, kwargs, output):
    logits = args[0]
    return api.liger_cross_entropy(logits.shape[0], logits.shape[-1])


def liger_fused_linear_cross_entropy(args, kwargs, output):
    x, weight = args[0], args[1]
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    return api.liger_fused_linear_cross_entropy(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1], weight.shape[0],
                                                bias=isinstance(bias, torch.Tensor),
                                                weight_grad=weight.requires_grad)


def liger_jsd(args, kwargs, output):
    return api.liger_jsd(args[0].numel())  # (input, target, shift_labels, beta, ignore_index)


def liger_kl_div(args, kwargs, output):
    return api.liger_kl_div(args[0].numel())  # (y_pred, y_true, reduction, log_target, eps)


def liger_fused_linear_jsd(args, kwargs, output):
    b = _bind(("student_input", "student_weight", "teacher_input", "teacher_weight"), args, kwargs)
    x, w, teacher = b["student_input"], b["student_weight"], b["teacher_input"]
    return api.liger_fused_linear_jsd(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1], teacher.shape[-1], w.shape[0],
                                      weight_grad=w.requires_grad)


def _bind(names, args, kwargs) -> dict:
    return {**dict(zip(names, args)), **kwargs}


def mamba_chunk_scan_combined(args, kwargs, output):
    b = _bind(("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "initial_states", "seq_idx",
               "cu_seqlens", "dt_softplus"), args, kwargs)
    x, bc = b["x"], b["B"]
    return mamba_ssm.ssd_chunk_scan(x.shape[0], x.shape[1], x.shape[2], x.shape[3], bc.shape[-1], bc.shape[2],
                                    int(b["chunk_size"]), has_d=b.get("D") is not None, has_z=b.get("z") is not None,
                                    dt_bias=b.get("dt_bias") is not None, dt_softplus=bool(b.get("dt_softplus")))


def _fla(names, *, delta: bool, gate):
    def formula(args, kwargs, output):
        b = _bind(names, args, kwargs)
        q, v = b["q"], b["v"]
        scalar_gate = gate if gate != "auto" else ("scalar" if b.get("g") is not None or
                                                   b.get("g_gamma") is not None else None)
        return fla.chunked_linear_attention(fla.sequence_lengths(q.shape, b.get("cu_seqlens")), v.shape[2],
                                            q.shape[-1], v.shape[-1], delta=delta, gate=scalar_gate)
    return formula


def unsloth_rms_layernorm(args, kwargs, output):
    b = _bind(("X", "W", "eps", "gemma"), args, kwargs)
    x = b["X"]
    return unsloth.rms_layernorm(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1], gemma=bool(b.get("gemma")))


def unsloth_layernorm(args, kwargs, output):
    x = args[0]
    return unsloth.layernorm(api.tokens_of(x.shape, x.shape[-1]), x.shape[-1])


def unsloth_rope(args, kwargs, output):
    return unsloth.rope(args[0].numel())


def unsloth_rope_qk(args, kwargs, output):
    return unsloth.rope(args[0].numel() + args[1].numel())


def unsloth_cross_entropy(args, kwargs, output):
    b = _bind(("logits", "labels", "logit_softcapping", "logit_scaling"), args, kwargs)
    rows, vocab = b["logits"].shape
    return unsloth.cross_entropy(rows, vocab, softcap=bool(b.get("logit_softcapping")),
                                 scaling=bool(b.get("logit_scaling")))


def _unsloth_glu(kind: str, backward: bool):
    def formula(args, kwargs, output):
        e = args[1] if backward else args[0]  # backward(DW, e, g), forward(e, g)
        works = unsloth.glu_backward(e.numel(), kind) if backward else unsloth.glu_forward(e.numel(), kind)
        return works, []  # booked where it runs: the backward kernel runs in autograd's backward
    return formula


def unsloth_grouped_gemm(args, kwargs, output):
    b = _bind(("X", "W", "m_sizes", "topk", "gather_indices", "permute_x"), args, kwargs)
    x, w = b["X"], b["W"]
    rows = x.shape[0] * int(b["topk"]) if b.get("permute_x") else x.shape[0]
    return unsloth.grouped_gemm(rows, w.shape[1], w.shape[2], input_grad=x.requires_grad,
                                weight_grad=w.requires_grad)


# (module path, attribute) -> formula(args, kwargs, output) -> (forward, backward works). Liger's
# autograd Functions are wrapped at their ``apply``.
FUNCTIONS = {
    ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"): selective_scan_fn,
    ("causal_conv1d.causal_conv1d_interface", "causal_conv1d_fn"): causal_conv1d_fn,
    ("liger_kernel.ops.rms_norm", "LigerRMSNormFunction.apply"): liger_rms_norm,
    ("liger_kernel.ops.layer_norm", "LigerLayerNormFunction.apply"): liger_layer_norm,
    ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction.apply"): liger_swiglu,
    ("liger_kernel.ops.geglu", "LigerGELUMulFunction.apply"): liger_geglu,
    ("liger_kernel.ops.rope", "LigerRopeFunction.apply"): liger_rope,
    ("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction.apply"): liger_cross_entropy,
    ("liger_kernel.ops.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyFunction.apply"):
        liger_fused_linear_cross_entropy,
    ("liger_kernel.ops.jsd", "LigerJSDFunction.apply"): liger_jsd,
    ("liger_kernel.ops.kl_div", "LigerKLDivLossFunction.apply"): liger_kl_div,
    ("liger_kernel.ops.fused_linear_jsd", "LigerFusedLinearJSDFunction.apply"): liger_fused_linear_jsd,
    ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"): mamba_chunk_scan_combined,
    ("fla.ops.gla.chunk", "chunk_gla"): _fla(("q", "k", "v", "g"), delta=False, gate="vector"),
    ("fla.ops.simple_gla.chunk", "chunk_simple_gla"): _fla(("q", "k", "v", "g", "g_gamma"), delta=False,
                                                           gate="auto"),
    ("fla.ops.delta_rule.chunk", "chunk_delta_rule"): _fla(("q", "k", "v", "beta"), delta=True, gate=None),
    ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule"): _fla(("q", "k", "v", "g", "beta"), delta=True,
                                                                       gate="scalar"),
    ("unsloth.kernels.rms_layernorm", "Fast_RMS_Layernorm.apply"): unsloth_rms_layernorm,
    ("unsloth.kernels.layernorm", "Fast_Layernorm.apply"): unsloth_layernorm,
    ("unsloth.kernels.rope_embedding", "Fast_RoPE_Embedding.apply"): unsloth_rope,
    ("unsloth.kernels.rope_embedding", "Fast_RoPE_Embedding_QK.apply"): unsloth_rope_qk,
    ("unsloth.kernels.cross_entropy_loss", "Fast_CrossEntropyLoss.apply"): unsloth_cross_entropy,
    ("unsloth.kernels.swiglu", "swiglu_fg_kernel"): _unsloth_glu("swiglu", backward=False),
    ("unsloth.kernels.swiglu", "swiglu_DWf_DW_dfg_kernel"): _unsloth_glu("swiglu", backward=True),
    ("unsloth.kernels.geglu", "geglu_exact_forward_kernel"): _unsloth_glu("geglu_exact", backward=False),
    ("unsloth.kernels.geglu", "geglu_exact_backward_kernel"): _unsloth_glu("geglu_exact", backward=True),
    ("unsloth.kernels.geglu", "geglu_approx_forward_kernel"): _unsloth_glu("geglu_approx", backward=False),
    ("unsloth.kernels.geglu", "geglu_approx_backward_kernel"): _unsloth_glu("geglu_approx", backward=True),
    ("unsloth.kernels.moe.grouped_gemm.interface", "grouped_gemm"): unsloth_grouped_gemm,
}

for (_root, _name) in MODULES:
    dark.COUNTED_CLASSES.add((_root, _name))


# ---- booking --------------------------------------------------------------------------------------

class _Active:
    """The wrappers installed while meters are active (their counters: ``HOOKS.api_counters``,
    capture/active.py)."""

    restore: list = []  # (namespace dict or class, attribute, original)


def _book(name: str, works, output) -> None:
    forward, backward = works
    counters = list(HOOKS.api_counters)
    for counter in counters:
        counter.book(name, forward)
    out = _first_tensor(output)
    if backward and out is not None and out.grad_fn is not None:
        def book_backward(grad_outputs, counters=counters):
            enter_api()  # the library's backward kernels (Triton) are this work: not uncounted
            for counter in counters:
                counter.book(name, backward)

        out.grad_fn.register_prehook(book_backward)
        out.grad_fn.register_hook(lambda grad_inputs, grad_outputs: leave_api())


def _counting(name: str, fn, formula):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with counted_at_api():  # its Triton kernels are this call's work
            output = fn(*args, **kwargs)
        if HOOKS.api_counters and not torch.compiler.is_compiling():
            try:
                works = formula(args, kwargs, output)
            except Exception as exc:  # a formula never breaks training: the call is reported
                for counter in list(HOOKS.api_counters):
                    counter.uncounted(name, f"formula failed: {type(exc).__name__}: {exc}")
                return output
            _book(name, works, output)
        return output

    wrapper.__flopcount_wrapped__ = fn
    return wrapper


def _install_functions() -> None:
    for (module_path, attribute), formula in FUNCTIONS.items():
        module = sys.modules.get(module_path)
        if module is None:
            continue
        owner_name, _, attr = attribute.rpartition(".")
        if owner_name:  # Function.apply: a classmethod on the class
            owner = getattr(module, owner_name, None)
            if owner is None:
                continue
            original = owner.__dict__.get(attr)  # None: inherited (Function.apply)
            bound = getattr(owner, attr)
            setattr(owner, attr, _counting(f"{module_path}.{attribute}", bound, formula))
            _Active.restore.append((owner, attr, original))
            continue
        original = getattr(module, attr, None)
        if original is None:
            continue
        wrapper = _counting(f"{module_path}.{attr}", original, formula)
        for other in list(sys.modules.values()):  # every binding of it (from X import fn)
            namespace = getattr(other, "__dict__", None)
            if isinstance(namespace, dict):
                for key, value in list(namespace.items()):
                    if value is original:
                        namespace[key] = wrapper
                        _Active.restore.append((namespace, key, original))


def _restore() -> None:
    for owner, attr, original in reversed(_Active.restore):
        if isinstance(owner, dict):
            owner[attr] = original
        elif original is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _Active.restore = []


class _ModuleWatch:
    """A module-hook subscriber: books the counted library modules at their forward's end."""

    def __init__(self, counter) -> None:
        self.counter = counter
        self.formulas: dict = {}  # class -> formula or None
        self.where: list = []  # (module, phase, module name) of open counted forwards

    def _module_pre(self, module, args) -> None:
        cls = type(module)
        formula = self.formulas.get(cls, False)
        if formula is False:
            formula = self.formulas[cls] = MODULES.get((cls.__module__.split(".", 1)[0], cls.__name__))
        if formula is not None:
            self.where.append((module, *self.counter.context.where()))

    def _module_post(self, module, args, output) -> None:
        if not self.where or self.where[-1][0] is not module:
            return
        _, phase, name = self.where.pop()
        cls = type(module)
        op = f"{cls.__module__}.{cls.__name__}"
        try:
            forward, backward = self.formulas[cls](module, args, {}, output)
        except Exception as exc:
            self.counter.uncounted(op, f"formula failed: {type(exc).__name__}: {exc}")
            return
        self.counter.book(op, forward, phase=phase, module=name)
        out = _first_tensor(output)
        if backward and out is not None and out.grad_fn is not None:
            counter = self.counter
            out.grad_fn.register_prehook(lambda grads: counter.book(op, backward))


def watch_api_kernels(counter) -> list:
    """Count the libraries above for one meter. Returns handles with ``remove()``."""
    from ..capture.context import MODULE_HOOKS

    with _LOCK:
        if not HOOKS.api_counters:
            _install_functions()
        HOOKS.api_counters = [*HOOKS.api_counters, counter]
    handles = [_Handle(counter)]
    if any(root in sys.modules for root in MODULE_ROOTS):  # their modules exist only once they are imported
        handles.append(MODULE_HOOKS.subscribe(_ModuleWatch(counter)))
    return handles


class _Handle:
    def __init__(self, counter) -> None:
        self.counter = counter

    def remove(self) -> None:
        with _LOCK:
            HOOKS.api_counters = [c for c in HOOKS.api_counters if c is not self.counter]
            if not HOOKS.api_counters:
                _restore()
