"""Shared by the distributed worker scripts: the model, the batches, the single-process reference,
and how a rank writes its results (one JSON file per rank and check, read by the pytest wrapper).

The model is an MLP of Linear layers in column/row pairs (the shape tensor parallelism shards),
so its matmul FLOPs have a closed form that the tests compute independently.
"""
from __future__ import annotations

import json
import os
import sys

import torch

# Model and batch sizes; the pytest wrappers import these to compute the closed form.
DIM, HIDDEN, CLASSES = 16, 32, 8
BLOCKS = 2
BATCH, SEQ = 4, 6
STEPS = 2


def layer_dims() -> list[tuple[int, int]]:
    """(in_features, out_features) of every Linear in forward order."""
    dims = []
    for _ in range(BLOCKS):
        dims += [(DIM, HIDDEN), (HIDDEN, DIM)]
    return dims + [(DIM, CLASSES)]


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(DIM, HIDDEN)
        self.down = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = torch.nn.Linear(DIM, CLASSES)

    def forward(self, x):
        x = x.reshape(-1, DIM)  # 2-D activations: FSDP2 warns about modules returning views
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model() -> MLP:
    torch.manual_seed(0)
    return MLP()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each data-parallel rank gets its own batch (same shapes on every rank)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, SEQ, DIM, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * SEQ,), generator=g)
    return x, y


def loss_fn(logits, y):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)


def train(model, optimizer, m, rank: int) -> None:
    """STEPS steps of forward, backward and optimizer, each closed with m.step()."""
    for step in range(STEPS):
        x, y = batch(rank, step)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        m.step(tokens=BATCH * SEQ, samples=BATCH)


def backends() -> list[str]:
    """Capture backends to check: both where the native extension loads (FLOPCOUNT_DIST_BACKENDS
    narrows the list)."""
    from flopcount.capture import native

    wanted = os.environ.get("FLOPCOUNT_DIST_BACKENDS", "dispatch native").split()
    return [b for b in wanted if b != "native" or native.load() is not None]


def single_process_summary(backend: str) -> dict:
    """The same model and batches, one process, no parallelism: the reference count."""
    import flopcount

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with flopcount.meter(backend=backend, warn=False) as m:
        train(model, optimizer, m, rank=0)
    return m.summary()


def write_metered(out_dir: str, name: str, rank: int, m, **extra) -> None:
    """A rank's result for one check: its summary, the job-wide totals that sync_every left in
    m.job_totals, the totals asked for once more, and the last step's collectives."""
    write_result(out_dir, name, rank, summary=m.summary(), auto_totals=m.job_totals,
                 on_request=m.global_totals(),
                 last_step={"collectives": m.last_step.collectives,
                            "collective_bytes": m.last_step.collective_bytes}, **extra)


def write_result(out_dir: str, check: str, rank: int, **result) -> None:
    path = os.path.join(out_dir, f"{check}.rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def out_dir_arg() -> str:
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [checks...]")
    os.makedirs(sys.argv[1], exist_ok=True)
    return sys.argv[1]


def exit_cleanly() -> None:
    """Leave without interpreter finalization: gloo's worker threads can abort the process
    (SIGABRT, "terminate called without an active exception") while Python tears down, after all
    results are written (pytorch/pytorch#190489, #179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
