"""A DDP training script (gloo, CPU) that starts its own ranks with torch.multiprocessing.spawn and
knows nothing about flopcount. Each rank: Linear 16 -> 32 -> 4 (bias), batch 8, SGD, STEPS steps,
its batches from a DataLoader with one worker process started by spawn (workers do no training)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel


def batches(steps: int):
    x, y = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), torch.randn(8, 4)
    data = torch.utils.data.TensorDataset(x.repeat(steps, 1), y.repeat(steps, 1))
    return torch.utils.data.DataLoader(data, batch_size=8, num_workers=1, multiprocessing_context="spawn")


def rank_main(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                                        torch.nn.Linear(32, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in batches(int(os.environ.get("STEPS", "3"))):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(2, port), nprocs=2)
