"""Rollouts generated outside PyTorch (TRL's ``use_vllm=True``): FLOPs derived from token counts.

vLLM runs its own kernels, in a server process or through a colocated ``vllm.LLM``: no capture
path sees them. TRL hands every rollout back as token ids, through ``VLLMGeneration.generate``
(GRPO, RLOO, distillation: server and colocate mode alike) or online DPO's
``_generate_vllm_server`` / ``_generate_vllm_colocate`` (the server's prompt ids are TRL's local,
left-padded re-tokenisation: their pad tokens are dropped, the engine never ran them). From the
prompt and completion lengths flopcount derives what the engine computed (docs/conventions.md,
"Rollouts outside PyTorch"):

- a completion of C tokens after a prompt of P tokens is the policy's forward at every position
  it processed, P prompt positions and the C - 1 generated tokens fed back, each attending to its
  context (KV cache), plus the output layer at the C positions that were sampled. That is exactly
  one causal forward over N = P + C - 1 positions that keeps the logits of the last C
  (``logits_to_keep=C``): the same pairs of (query, key) as prefill plus decoding.
- Its FLOPs come from flopcount's own formulas: the policy is built from its config on the meta
  device (flopcount/planning/model.py) and that forward is counted, per category, by the same
  registry as a metered run. Every category is a polynomial a + b·N + c·N² + d·C (layers per
  position, attention pairs, output layer), so four meta forwards give its coefficients and two
  more check them; a model for which the check fails is counted by one meta forward per (N, C).
- Prefill is counted once per completion: the engine may share a prompt's prefill among its
  samples (``n`` > 1, prefix caching), so this errs toward counting by at most that prefill.
  The engine's sampling and bookkeeping are not model FLOPs and are not counted.

The FLOPs are booked in the open step of every active meter, phase ``generation`` (``eval``
inside an evaluation, or the user's phase when one is open), module ``<none>``, op
``derived.vllm.generate`` (one call per completion): derived, not captured (trace/schema.py).
Rollouts whose token counts cannot be read, or a model that cannot be built on the meta device,
are booked as uncounted ``vllm.generate``: never a silent zero.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from fractions import Fraction

from ..conventions import DERIVED_OP_PREFIX, GENERATION, NO_MODULE

DERIVED_OP = DERIVED_OP_PREFIX + "vllm.generate"
UNCOUNTED_OP = "vllm.generate"
# (N, C) of the meta forwards that give the coefficients, and of those that check them.
FIT_POINTS = ((2, 1), (3, 1), (4, 1), (3, 2))
CHECK_POINTS = ((9, 4), (33, 17))

_COSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # policy model -> ForwardCost
_SEEN = threading.local()  # rollouts booked in this thread (tags.py: a vLLM trainer's generation saw some)


def rollouts_seen() -> int:
    return getattr(_SEEN, "count", 0)


class ForwardCost:
    """FLOPs per category of the policy's forward over N positions keeping C logits, from forwards
    on the meta device (exact polynomial coefficients, or one meta forward per (N, C))."""

    def __init__(self, config) -> None:
        self.values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.net = None
        self.uncounted: dict[str, int] = {}  # ops without a formula in the meta forward
        self.direct: dict[tuple[int, int], dict[str, int]] = {}
        self.coefficients = self._fit()

    def flops(self, n: int, c: int) -> dict[str, int]:
        if self.coefficients is None:
            if (n, c) not in self.direct:
                self.direct[(n, c)] = self._measure(n, c)
            return self.direct[(n, c)]
        return {cat: int(a + b * n + q * n * n + d * c) for cat, (a, b, q, d) in self.coefficients.items()}

    def _fit(self):
        f = {point: self._measure(*point) for point in FIT_POINTS}
        categories = set().union(*f.values())
        coefficients = {}
        for cat in categories:
            (f21, f31, f41, f32) = (Fraction(f[p].get(cat, 0)) for p in FIT_POINTS)
            q = (f41 - 2 * f31 + f21) / 2
            d = f32 - f31
            b = f31 - f21 - 5 * q
            a = f21 - 2 * b - 4 * q - d
            coefficients[cat] = (a, b, q, d)
        for n, c in CHECK_POINTS:
            measured = self._measure(n, c)
            predicted = {cat: a + b * n + q * n * n + d * c for cat, (a, b, q, d) in coefficients.items()}
            if {k: v for k, v in measured.items() if v} != {k: v for k, v in predicted.items() if v}:
                return None  # not a polynomial of that form (e.g. data-dependent routing): measure each
        return coefficients

    def _measure(self, n: int, c: int) -> dict[str, int]:
        import torch

        from ..capture.context import Context, HookGuard
        from ..capture.counter import Counter
        from ..capture.dispatch import DispatchCapture
        from ..planning.step import fused_attention, unpacked_batches

        with unmetered():
            if self.net is None:
                from ..planning.model import build

                self.net = build(self.values, attn="sdpa").eval()
            context = Context(on_optimizer_step=lambda: None, track_modules=False, guard=HookGuard(warn=False))
            counter = Counter(context, warn=False)
            ids = torch.zeros(1, n, dtype=torch.long, device="meta")
            with torch.no_grad(), fused_attention(), unpacked_batches(), DispatchCapture(counter):
                self.net(input_ids=ids, logits_to_keep=c, use_cache=False)
        for op, calls in counter.acc.uncounted.items():
            self.uncounted[op] = max(self.uncounted.get(op, 0), calls)
        out: dict[str, int] = {}
        for (_, category, _, _), flops in counter.acc.flops.items():
            out[category] = out.get(category, 0) + flops
        return out


@contextlib.contextmanager
def unmetered():
    """flopcount's own model runs are nobody's work: every active meter's capture steps aside and
    no meter sees their module calls (this thread only)."""
    from ..capture import compile as compiled_regions
    from ..capture.context import MODULE_HOOKS

    with contextlib.ExitStack() as stack:
        for meter in list(compiled_regions.HOOKS.meters):
            stack.enter_context(meter._unmetered())
        stack.enter_context(MODULE_HOOKS.muted())
        yield


def forward_cost(model) -> ForwardCost:
    """The policy's ForwardCost (cached per model: the architecture does not change in training)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: vLLM runs merged weights
    base = getattr(base, "module", base)  # DDP / accelerate wrappers
    cost = _COSTS.get(base)
    if cost is None:
        config = getattr(base, "config", None)
        if config is None:
            raise ValueError(f"{type(base).__name__} has no config to build on the meta device")
        cost = _COSTS[base] = ForwardCost(config)
    return cost


def rollout_flops(cost: ForwardCost, prompt_len: int, completion_len: int) -> dict[str, int]:
    """FLOPs per category of one completion: the causal forward over P + C - 1 positions keeping
    the logits of C (an empty completion still ran its prompt's prefill)."""
    c = max(int(completion_len), 1)
    return cost.flops(int(prompt_len) + c - 1, c)


def _meters():
    from ..capture import compile as compiled_regions

    return [m for m in compiled_regions.HOOKS.meters if getattr(m, "_active", False)]


def _phase(meter) -> str:
    """The open tag or user phase (``eval`` inside an evaluation, the user's own), else generation."""
    user = meter.context.user_phases  # tags, user phases and eval only: never a built-in training phase
    return user[-1] if user else GENERATION


def book_rollouts(model, prompt_ids, completion_ids) -> None:
    """Book the rollouts (one prompt's token ids per completion) in every active meter. Never
    raises into the trainer, except strict mode's UncountedOpError (asked for)."""
    from ..formulas.registry import Work

    meters = _meters()
    if not meters:
        return
    try:
        pairs = _lengths(prompt_ids, completion_ids)
    except (TypeError, ValueError) as e:
        return _uncounted(meters, f"rollout token counts unreadable: {e}")
    if not pairs:
        return
    try:
        cost = forward_cost(model)
        per_completion = [rollout_flops(cost, p, c) for p, c in pairs]
    except Exception as e:  # a model the meta device cannot build: say so, never zero
        return _uncounted(meters, f"policy forward not derivable: {type(e).__name__}: {e}")
    _SEEN.count = rollouts_seen() + len(pairs)
    for meter in meters:
        phase = _phase(meter)
        for flops in per_completion:
            meter.counter.book(DERIVED_OP, [Work(cat, f, None) for cat, f in sorted(flops.items()) if f],
                               phase=phase, module=NO_MODULE)
        for op in cost.uncounted:  # ops of the forward without a formula: the derived figure is a lower bound
            meter.counter.uncounted(op, "no formula (in the derived vLLM forward)")


def _lengths(prompt_ids, completion_ids) -> list[tuple[int, int]]:
    if prompt_ids is None or completion_ids is None:
        raise ValueError("the engine returned no token ids")
    prompts, completions = [len(p) for p in prompt_ids], [len(c) for c in completion_ids]
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return list(zip(prompts, completions))


def _uncounted(meters, why: str) -> None:
    for meter in meters:
        meter.counter.uncounted(UNCOUNTED_OP, why)


def book_unseen_rollouts(why: str) -> None:
    """A vLLM trainer's generation call returned without any rollout booked: uncounted work."""
    _uncounted(_meters(), why)


# ---- TRL's entry points (integrations/tags.py patches them) -----------------------------------

def vllm_generation_generate(raw, generation, *args, **kwargs):
    """``VLLMGeneration.generate`` -> (prompt_ids, completion_ids, logprobs, logprob_token_ids)."""
    out = raw(generation, *args, **kwargs)
    _safely(lambda: book_rollouts(generation.model, out[0], out[1]))
    return out


def online_dpo_generate(raw, trainer, *args, **kwargs):
    """Online DPO's ``_generate_vllm_colocate`` -> (completion_ids, prompt_ids): the engine's own
    prompt token ids."""
    out = raw(trainer, *args, **kwargs)
    _safely(lambda: book_rollouts(trainer.model, out[1], out[0]))
    return out


def online_dpo_generate_server(raw, trainer, *args, **kwargs):
    """Online DPO's ``_generate_vllm_server`` -> (completion_ids, prompt_ids): the server got the
    prompts as text and ran each alone, but TRL re-tokenises them locally as one left-padded batch
    for the ids it returns. The engine's prompt lengths are those ids without their left padding."""
    out = raw(trainer, *args, **kwargs)
    _safely(lambda: book_rollouts(trainer.model, without_left_padding(out[1], _pad_token_id(trainer)), out[0]))
    return out


def without_left_padding(prompt_ids, pad_id):
    """Each prompt's ids without the leading pad tokens (pad_id None: as they are). A prompt whose
    own text began with the pad token would lose those tokens too; chat templates and plain
    prompts start with text or a BOS token, not the pad token."""
    if pad_id is None or prompt_ids is None:
        return prompt_ids
    out = []
    for ids in prompt_ids:
        ids = list(ids)
        start = next((i for i, token in enumerate(ids) if token != pad_id), len(ids))
        out.append(ids[start:])
    return out


def _pad_token_id(trainer):
    """The pad id TRL padded with: its tokenizer's (a processor's tokenizer for multimodal models)."""
    tokenizer = getattr(trainer, "_tokenizer", None) or getattr(trainer, "processing_class", None)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return getattr(tokenizer, "pad_token_id", None)


def _safely(book) -> None:
    """A meter never breaks training: any failure of the booking is uncounted work (strict mode's
    UncountedOpError is asked for and passes)."""
    from ..capture.counter import UncountedOpError

    if not _meters():
        return
    try:
        book()
    except UncountedOpError:
        raise
    except Exception as e:
        _uncounted(_meters(), f"rollouts not booked: {type(e).__name__}: {e}")

