"""Phase tags for framework code: TRL's no-grad training work and the Trainer's evaluation loops.

Work that feeds a training step's loss is training compute with or without gradients
(docs/conventions.md, "No-grad training work"). TRL runs it in known places; this module wraps
those methods (read from TRL 1.16's source) so that the work inside them is booked in its phase
by every active meter:

- ``generation``: the rollouts of GRPO, RLOO, online DPO, distillation (on-policy) and GKD, and
  the policy's no-grad log-probs of its own rollouts (GRPO/RLOO ``old_per_token_logps``);
- ``reference``: reference models (DPO, GRPO, RLOO, online DPO; also PEFT's adapter-disabled
  reference, ``use_adapter``) and DPO's ``compute_ref_log_probs``, including the
  ``precompute_ref_log_probs`` pass over the training set that runs before training;
- ``teacher``: the teacher model of the distillation trainers (GKD, DistillationTrainer), and
  the teacher's LM head projection that DistillationTrainer's chunked divergence
  (``trl.kernels.chunked_divergence``) runs itself, outside the teacher's call: its
  ``_project`` is tagged by the weight it projects through (a tagged model's parameter);
- ``recompute``: that chunked divergence projects both models' hidden states again where it
  needs logits it computed before (recomputed instead of kept, to save memory): its backward,
  and with 0 < beta < 1 its forward's second pass (the mixture's); its gradient GEMMs stay
  backward;
- ``reward``: reward functions and reward models scoring rollouts;
- ``generation``, derived: rollouts that vLLM generates (``use_vllm=True``, server or colocated),
  booked from their token counts by integrations/vllm.py (``VLLMGeneration.generate``, online
  DPO's vLLM calls); a vLLM trainer's generation that shows no token counts is uncounted work;
- ``eval``: ``Trainer.evaluate`` and ``Trainer.predict`` (and DPO's reference pass over an
  evaluation set): held-out evaluation, which always wins over the tags inside it.

A tag opens only where no phase is open yet (``recompute``, like ``eval``, always opens), so the
outermost decides and an explicit ``Meter.phase`` / ``Meter.evaluating()`` wins. Models are
tagged when ``Trainer.train`` starts (or the DPO reference pass runs): their attributes
``ref_model``, ``teacher_model``, ``reward_model`` and the ``nn.Module`` entries of
``reward_funcs``, with their parameters (``MODEL_PHASES.weights``). ``install()`` patches the
classes and functions once per process (the HF callback and ``flopcount run`` call it); the
wrappers do nothing while no meter is active.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys

from ..capture.active import MODEL_PHASES, PROJECTED, active_contexts
from ..conventions import EVAL, GENERATION, RECOMPUTE, REFERENCE, REWARD, TEACHER
from . import vllm

# module -> class -> method -> phase. A phase of None: the method tags by its arguments (below).
METHOD_TAGS = {
    "transformers.trainer": {"Trainer": {"evaluate": EVAL, "predict": EVAL, "train": None}},
    "trl.trainer.dpo_trainer": {"DPOTrainer": {"compute_ref_log_probs": REFERENCE, "_precompute_ref_logps": None}},
    "trl.trainer.grpo_trainer": {"GRPOTrainer": {"_generate": GENERATION, "_calculate_rewards": REWARD,
                                                 "_get_per_token_logps_and_entropies": None}},
    "trl.trainer.rloo_trainer": {"RLOOTrainer": {"_generate": GENERATION, "_calculate_rewards": REWARD,
                                                 "_get_per_token_logps_and_entropies": None}},
    "trl.trainer.distillation_trainer": {"DistillationTrainer": {"_generate": GENERATION}},
    "trl.experimental.gkd.gkd_trainer": {"GKDTrainer": {"generate_on_policy_outputs": GENERATION}},
    "trl.experimental.online_dpo.online_dpo_trainer": {
        "OnlineDPOTrainer": {"_generate": GENERATION, "_calculate_rewards_from_functions": REWARD,
                             "_generate_vllm_server": None, "_generate_vllm_colocate": None}},
    # vLLM rollouts (server or colocated engine): FLOPs derived from their token counts (vllm.py).
    "trl.generation.vllm_generation": {"VLLMGeneration": {"generate": None}},
}
# Modules whose ``use_adapter`` context manager selects PEFT's reference (adapter disabled or "ref").
ADAPTER_MODULES = ("trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")
MODEL_ATTRIBUTES = {"ref_model": REFERENCE, "teacher_model": TEACHER, "reward_model": REWARD}
_WRAPPED = "__flopcount_tag__"


@contextlib.contextmanager
def tag(phase: str):
    """Open ``phase`` in every active meter (evaluation and recompute: always; other tags: where
    none is open)."""
    opened = []
    for context in active_contexts():
        if phase in (EVAL, RECOMPUTE):
            context.push_user_phase(phase)
            opened.append(context)
        elif context.push_tag(phase):
            opened.append(context)
    try:
        yield
    finally:
        for context in opened:
            context.pop_user_phase()


def tag_models(trainer) -> None:
    """Tag the trainer's reference, teacher and reward models (each submodule: a call of the
    backbone alone is tagged too; each parameter: a weight used outside the model's calls)."""
    import torch

    models = [(getattr(trainer, attr, None), phase) for attr, phase in MODEL_ATTRIBUTES.items()]
    models += [(f, REWARD) for f in getattr(trainer, "reward_funcs", None) or ()]
    for model, phase in models:
        if isinstance(model, torch.nn.Module) and model is not getattr(trainer, "model", None):
            for module in model.modules():
                MODEL_PHASES.setdefault(module, phase)
            for weight in model.parameters():
                MODEL_PHASES.weights.setdefault(weight, phase)


def _wrap(cls, name: str, phase: str | None) -> None:
    raw = cls.__dict__.get(name)
    if raw is None or getattr(raw, _WRAPPED, False):
        return
    if isinstance(raw, staticmethod):
        inner = raw.__func__

        @functools.wraps(inner)
        def static(*args, **kwargs):
            with tag(phase):
                return inner(*args, **kwargs)
        setattr(static, _WRAPPED, True)
        setattr(cls, name, staticmethod(static))
        return
    chooser = _CHOOSERS.get(f"{cls.__name__}.{name}", _CHOOSERS.get(name))

    @functools.wraps(raw)
    def method(self, *args, **kwargs):
        if chooser is not None:  # it may start a meter (DPO's reference pass)
            return chooser(raw, self, *args, **kwargs)
        if not active_contexts():
            return raw(self, *args, **kwargs)
        if phase == GENERATION and getattr(self, "use_vllm", False):
            return _vllm_rollouts(raw, self, *args, **kwargs)
        with tag(phase):
            return raw(self, *args, **kwargs)
    setattr(method, _WRAPPED, True)
    setattr(cls, name, method)


# ---- methods whose phase depends on their arguments ------------------------------------------------

def _train(raw, trainer, *args, **kwargs):
    tag_models(trainer)
    return raw(trainer, *args, **kwargs)


def _precompute_ref_logps(raw, trainer, dataset, name, *args, **kwargs):
    """DPO's reference pass: over the training set it feeds the loss (reference, counted even though
    it runs before training); over an evaluation set it is evaluation."""
    _meter_callback_start(trainer)
    with tag(REFERENCE if name == "train" else EVAL):
        return raw(trainer, dataset, name, *args, **kwargs)


def _per_token_logps(raw, trainer, model, *args, **kwargs):
    """GRPO/RLOO: with the reference model (tagged) -> reference; the policy without grad -> its
    rollout's log-probs (generation); with grad -> the training forward."""
    import torch

    if torch.is_grad_enabled() or MODEL_PHASES.get(model) is not None:
        return raw(trainer, model, *args, **kwargs)
    with tag(GENERATION):
        return raw(trainer, model, *args, **kwargs)


def _vllm_rollouts(raw, trainer, *args, **kwargs):
    """A vLLM trainer's generation: its rollouts are booked from their token counts (vllm.py); a
    call that booked none (a custom rollout function calling the engine itself) is uncounted work."""
    seen = vllm.rollouts_seen()
    with tag(GENERATION):
        out = raw(trainer, *args, **kwargs)
        if vllm.rollouts_seen() == seen:
            vllm.book_unseen_rollouts(f"{type(trainer).__name__} generated with vLLM and no token counts were seen")
    return out


def _vllm_generation(raw, generation, *args, **kwargs):
    return vllm.vllm_generation_generate(raw, generation, *args, **kwargs)


def _online_dpo_vllm(raw, trainer, *args, **kwargs):
    return vllm.online_dpo_generate(raw, trainer, *args, **kwargs)


def _online_dpo_vllm_server(raw, trainer, *args, **kwargs):
    return vllm.online_dpo_generate_server(raw, trainer, *args, **kwargs)


def _lm_head_projection(raw, tile, hidden, weight, bias, start, *args, **kwargs):
    """One tile of the chunked divergence's LM head projections (``hidden @ weight[start:].T``):
    in autograd's backward, or a tile of the same hidden chunk projected again in the forward (the
    JSD's second pass), it recomputes logits computed before (recompute); else, through a tagged
    model's weight (the teacher's), it is that model's work; else the student's."""
    if not active_contexts():
        return raw(tile, hidden, weight, bias, start, *args, **kwargs)
    recomputed = _graph_task_id() != -1 or _projected_before(hidden, start)
    phase = RECOMPUTE if recomputed else MODEL_PHASES.weights.get(weight)
    if phase is None:
        return raw(tile, hidden, weight, bias, start, *args, **kwargs)
    with tag(phase):
        return raw(tile, hidden, weight, bias, start, *args, **kwargs)


def _projected_before(hidden, start) -> bool:
    """Whether this forward projected the tile at ``start`` of this hidden chunk already (each
    pass of TRL's forward projects one chunk of rows, kept as one tensor, at every tile)."""
    done = PROJECTED.setdefault(hidden, set())
    if start in done:
        return True
    done.add(start)
    return False


def _graph_task_id() -> int:
    import torch

    return torch._C._current_graph_task_id()


_CHOOSERS = {"train": _train, "_precompute_ref_logps": _precompute_ref_logps,
             "_get_per_token_logps_and_entropies": _per_token_logps, "VLLMGeneration.generate": _vllm_generation,
             "_generate_vllm_server": _online_dpo_vllm_server, "_generate_vllm_colocate": _online_dpo_vllm}
# module -> module-level function -> its chooser (the phase depends on the arguments).
FUNCTION_TAGS = {"trl.kernels.chunked_divergence": {"_project": _lm_head_projection}}
TAGGED_MODULES = (*METHOD_TAGS, *FUNCTION_TAGS)


def _meter_callback_start(trainer) -> None:
    """DPO's training-set reference pass runs in ``__init__``, before ``on_train_begin``: start the
    flopcount callback's meter now, so that the pass is counted. The callback is found by its
    ``start_early`` method (hf.FlopMeterCallback), since hf.py imports this module."""
    handler = getattr(trainer, "callback_handler", None)
    for callback in getattr(handler, "callbacks", ()):
        if callable(getattr(callback, "start_early", None)):
            callback.start_early(getattr(trainer, "model", None))


def _wrap_adapter(module) -> None:
    original = getattr(module, "use_adapter", None)
    if original is None or getattr(original, _WRAPPED, False):
        return

    @contextlib.contextmanager
    def use_adapter(*args, **kwargs):
        with tag(REFERENCE), original(*args, **kwargs) as value:
            yield value
    setattr(use_adapter, _WRAPPED, True)
    module.use_adapter = use_adapter


def patch_module(module_name: str) -> None:
    """Wrap the tagged methods of one imported module (idempotent)."""
    module = sys.modules.get(module_name)
    if module is None:
        return
    for class_name, methods in METHOD_TAGS.get(module_name, {}).items():
        cls = getattr(module, class_name, None)
        if cls is not None:
            for name, phase in methods.items():
                _wrap(cls, name, phase)
    for name, chooser in FUNCTION_TAGS.get(module_name, {}).items():
        _wrap_function(module, name, chooser)
    if module_name in ADAPTER_MODULES:
        _wrap_adapter(module)


def _wrap_function(module, name: str, chooser) -> None:
    """Wrap a module-level function (its module's own code calls it through the module's globals)."""
    raw = getattr(module, name, None)
    if raw is None or getattr(raw, _WRAPPED, False):
        return

    @functools.wraps(raw)
    def function(*args, **kwargs):
        return chooser(raw, *args, **kwargs)
    setattr(function, _WRAPPED, True)
    setattr(module, name, function)


class _AfterImport:
    """A meta-path finder: patches a tagged module right after it is imported (TRL imports its
    trainers lazily)."""

    def find_spec(self, name, path=None, target=None):
        if name not in TAGGED_MODULES or name in sys.modules:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class Loader:
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = loader
                loader.exec_module(module)
                patch_module(name)

        spec.loader = Loader()
        return spec


_FINDER = _AfterImport()


def install() -> None:
    """Patch the tagged modules already imported and those imported later (once per process)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    for module_name in TAGGED_MODULES:
        if module_name in sys.modules:
            patch_module(module_name)


def import_and_patch(module_name: str) -> None:
    """Import one tagged module now and patch it (tests; a missing optional module is ignored)."""
    try:
        importlib.import_module(module_name)
    except ImportError:
        return
    patch_module(module_name)
