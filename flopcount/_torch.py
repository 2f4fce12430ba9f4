"""The meter's one hard requirement, checked before anything imports torch."""
from __future__ import annotations

MIN_TORCH = (2, 5)
INSTALL = "pip install 'flopcount[torch]' or a torch>=2.5 build of your choice (https://pytorch.org/get-started)"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_torch() -> None:
    """ImportError in one line, saying how to install it, when PyTorch >= 2.5 is not installed.

    The analysis side (verify, summarize, check, estimate, report, models) never calls this: it
    runs without torch."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except ImportError:  # a finder that refuses torch outright
        spec = None
    if spec is None:
        raise ImportError(f"flopcount: the meter needs PyTorch >= 2.5, which is not installed: {INSTALL} "
                          "(reading traces works without it)")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("torch")
    except PackageNotFoundError:  # a source checkout on the path: trust it
        return
    if _version_tuple(found) < MIN_TORCH:
        raise ImportError(f"flopcount: the meter needs PyTorch >= 2.5, found {found}: {INSTALL}")
