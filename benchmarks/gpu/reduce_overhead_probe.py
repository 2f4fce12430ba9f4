"""Probe: which part of the meter breaks a torch.compile(mode="reduce-overhead") training loop
("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run")?
Runs the loop with no meter or under one backend, with or without module tracking,
and prints the full traceback of each failure. One variant per process:

    PYTHONPATH=.:benchmarks/gpu python benchmarks/gpu/reduce_overhead_probe.py none [mark]
    (variants: none, dispatch, native, "dispatch, track_modules=False", "native, track_modules=False")

On an H200 with torch 2.11 (2026-11-27) every variant failed, "none" included: the loop itself,
not the meter, is what torch rejects there."""
import traceback

import torch

import flopcount
from cudagraph_check import B, D, T, Block


def loop(make_meter, mark: bool) -> str:
    torch.manual_seed(0)
    model = Block().cuda()
    cmodel = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(B, T, D, device="cuda")
    try:
        with make_meter() as m:
            for _ in range(4):
                if mark:
                    torch.compiler.cudagraph_mark_step_begin()
                cmodel(x).sum().backward()
                if m is not None:
                    m.step()
        torch.cuda.synchronize()
        return "ok"
    except Exception:
        return traceback.format_exc()[-3000:]


class Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


variants = {
    "none": Nothing,
    "dispatch, track_modules=False": lambda: flopcount.meter(backend="dispatch", warn=False, track_modules=False),
    "native, track_modules=False": lambda: flopcount.meter(backend="native", warn=False, track_modules=False),
    "native": lambda: flopcount.meter(backend="native", warn=False),
    "dispatch": lambda: flopcount.meter(backend="dispatch", warn=False),
}
if __name__ == "__main__":  # one variant per process: dynamo's and cudagraph trees' state is per process
    import sys

    name, mark = sys.argv[1], sys.argv[2:] == ["mark"]
    print(f"==== {name}, mark_step_begin={mark}: {loop(variants[name], mark)}", flush=True)
