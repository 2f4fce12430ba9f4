"""An Accelerate training script (run with `accelerate launch --multi_gpu --num_processes 2`; on
a machine without CUDA it runs on CPU with gloo).

Linear 16 -> 32 -> 4 (bias), micro-batches of 8 per process, ACCUM micro-batches per SGD step
(default 1), STEPS optimizer steps. With FLOPCOUNT_OUT set it meters itself with flopcount.meter
as the README's Accelerate section shows; without it, it knows nothing about flopcount (for
`flopcount run -- accelerate launch ...`)."""
import contextlib
import os

import torch
from accelerate import Accelerator

accelerator = Accelerator(gradient_accumulation_steps=int(os.environ.get("ACCUM", "1")))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model, opt = accelerator.prepare(model, opt)
x, y = torch.randn(8, 16), torch.randn(8, 4)

metering = contextlib.nullcontext()
if os.environ.get("FLOPCOUNT_OUT"):
    import flopcount

    metering = flopcount.meter(os.environ["FLOPCOUNT_OUT"], backend="dispatch")
samples = 0
with metering as m:
    for micro_batch in range(int(os.environ.get("STEPS", "3")) * accelerator.gradient_accumulation_steps):
        with accelerator.accumulate(model):
            loss = torch.nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        samples += len(x)
        if m is not None and accelerator.sync_gradients:  # one flopcount step per optimizer step
            m.step(samples=samples)
            samples = 0
accelerator.wait_for_everyone()
accelerator.end_training()
