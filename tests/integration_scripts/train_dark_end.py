"""A plain training script that knows nothing about flopcount: Linear 16 -> 32 -> 4 (bias), batch 8,
SGD, STEPS steps; after the last optimizer step it evaluates, once, Linear 16 -> 4 followed by a module whose work
no capture path sees (its product computed in numpy, a "dark module"): trailing work, found when the meter
closes at exit."""
import os

import torch


class NumpyLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() @ self.weight.detach().numpy().T)


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(8, 16), torch.randn(8, 4)
for step in range(int(os.environ.get("STEPS", "3"))):
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
with torch.no_grad():  # a final evaluation through a numpy head: its module "1" is dark
    torch.nn.Sequential(torch.nn.Linear(16, 4), NumpyLinear())(x)
