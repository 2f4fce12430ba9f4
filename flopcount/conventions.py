"""Names shared by every part of flopcount: phases, categories and what counts as training.

The counting conventions themselves are documented in docs/conventions.md.
"""

# GEMM-like work (what tensor cores execute) and vector work.
GEMM_CATEGORIES = ("matmul", "attention", "conv")
VECTOR_CATEGORIES = ("pointwise", "norm", "reduction", "other")
CATEGORIES = GEMM_CATEGORIES + VECTOR_CATEGORIES

FORWARD = "forward"
BACKWARD = "backward"
RECOMPUTE = "recompute"
OPTIMIZER = "optimizer"
EVAL = "eval"
BUILTIN_PHASES = (FORWARD, BACKWARD, RECOMPUTE, OPTIMIZER, EVAL)

# No-grad work that feeds a training step's loss is training compute (docs/conventions.md,
# "No-grad training work"): reserved phase names, always training. The integrations tag them
# exactly (TRL's rollouts, reference and teacher forwards, reward scoring); NO_GRAD_TRAINING is
# the plain-loop rule's phase for no-grad work inside a step that also has gradient work.
GENERATION = "generation"
REFERENCE = "reference"
TEACHER = "teacher"
REWARD = "reward"
NO_GRAD_TRAINING = "no_grad_training"
NO_GRAD_TRAINING_PHASES = (GENERATION, REFERENCE, TEACHER, REWARD, NO_GRAD_TRAINING)
# No-grad work outside every explicit phase, until its step closes (never leaves the accumulator).
PROVISIONAL_NO_GRAD = "<no_grad>"

# Regulatory figure: forward + backward + optimizer + no-grad training work (+ user phases marked
# training). Recompute is excluded by guidelines Annex A.1 (recomputation of activations); eval is
# held-out evaluation (diagnostics).
GRADIENT_PHASES = frozenset({FORWARD, BACKWARD, OPTIMIZER})
TRAINING_PHASES = GRADIENT_PHASES | frozenset(NO_GRAD_TRAINING_PHASES)
EXCLUDED_PHASES = frozenset({RECOMPUTE, EVAL})

# Op-name prefix of FLOPs derived from counts instead of captured (trace/schema.py documents it).
DERIVED_OP_PREFIX = "derived."

# Module labels for ops that run directly in a root module's forward, or outside any module.
ROOT_MODULE = "<root>"
NO_MODULE = "<none>"
