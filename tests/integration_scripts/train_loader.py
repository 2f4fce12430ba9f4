"""A plain training script whose DataLoader workers prepare the data and which knows nothing about
flopcount. Linear 16 -> 32 -> 4 (bias), batch 8, SGD, STEPS steps; the batches come from a
DataLoader with WORKERS worker processes (default 2) started by CONTEXT (spawn, forkserver or
fork; default spawn), whose collate normalises each batch by its median: aten.median has no
formula, the work of a data transform, not of the model."""
import os

import torch


def collate(items):
    x, y = torch.utils.data.default_collate(items)
    return x - x.median(), y


def main() -> None:
    steps = int(os.environ.get("STEPS", "3"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(8 * steps, 16), torch.randn(8 * steps, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate,
                                         num_workers=int(os.environ.get("WORKERS", "2")),
                                         multiprocessing_context=os.environ.get("CONTEXT", "spawn"))
    for x, y in loader:
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


if __name__ == "__main__":
    main()
