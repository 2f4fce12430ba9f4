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

# Regulatory figure: forward + backward + optimizer (+ user phases marked training).
# Recompute is excluded by guidelines Annex A.1 (recomputation of activations); eval is diagnostics.
TRAINING_PHASES = frozenset({FORWARD, BACKWARD, OPTIMIZER})
EXCLUDED_PHASES = frozenset({RECOMPUTE, EVAL})

# Module labels for ops that run directly in a root module's forward, or outside any module.
ROOT_MODULE = "<root>"
NO_MODULE = "<none>"
