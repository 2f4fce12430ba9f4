"""A plain PyTorch training script that knows nothing about flopcount (for `flopcount run` tests).

Two Linear layers (16 -> 32 -> 4, with bias), batch 8, SGD; STEPS steps, then one no-grad forward
(evaluation), then exit with status EXIT (or raise with RAISE=1). With READY_FILE set it writes
that file after training and sleeps, to be stopped by a signal."""
import os
import sys
import time

import torch

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(8, 16), torch.randn(8, 4)
for step in range(int(os.environ.get("STEPS", "3"))):
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
with torch.no_grad():
    model(x)
if os.environ.get("READY_FILE"):
    open(os.environ["READY_FILE"], "w").close()
    time.sleep(120)
if os.environ.get("RAISE"):
    raise RuntimeError("the training script failed")
sys.exit(int(os.environ.get("EXIT", "0")))
