"""Put on PYTHONPATH by ``flopcount run``: meters this Python process when FLOPCOUNT_RUN is set.

Python imports ``sitecustomize`` at start-up. Without FLOPCOUNT_RUN this file does nothing but
hand over to the ``sitecustomize`` it shadows (if any), so a stray PYTHONPATH entry is harmless.
With it, metering starts right after the program's own ``import torch`` (flopcount imports torch,
so importing it here would run torch's import before the program's first lines).
"""
import os
import sys


def _start_metering():
    try:
        from flopcount.integrations.process import start
    except ImportError as e:  # another interpreter without flopcount: run it unmetered
        sys.stderr.write(f"flopcount: not metering {sys.executable} (cannot import flopcount: {e})\n")
        return
    start()


class _AfterTorchImport:
    """A meta-path finder: lets the real finder load torch, then starts metering. It stays in place
    until torch is really imported: libraries ask ``importlib.util.find_spec("torch")`` first to see
    whether torch is installed (datasets, transformers), which finds the module without loading it."""

    def __init__(self):
        self.looking = False

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.looking:
            return None
        import importlib.util

        self.looking = True  # the real finders answer the lookup below
        try:
            spec = importlib.util.find_spec("torch")
        finally:
            self.looking = False
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _StartAfterExec(spec.loader, self)
        return spec


class _StartAfterExec:
    def __init__(self, loader, finder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        module.__loader__ = module.__spec__.loader = self.loader  # torch keeps its own loader
        self.loader.exec_module(module)
        _start_metering()


def _chain_shadowed_sitecustomize():
    """Run the sitecustomize this one shadows, so that `flopcount run` changes nothing else."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


if os.environ.get("FLOPCOUNT_RUN"):
    if "torch" in sys.modules:
        _start_metering()
    else:
        sys.meta_path.insert(0, _AfterTorchImport())
_chain_shadowed_sitecustomize()
