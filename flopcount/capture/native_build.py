"""The native build's former home: it is ``flopcount.capture.native.builder`` now. This name stays
importable (the same module object, so its functions and state are the builder's own)."""
import sys

from .native import builder

sys.modules[__name__] = builder
