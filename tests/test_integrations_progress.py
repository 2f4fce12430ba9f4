"""Progress bars: long reads show a tqdm bar on a terminal (a real pty), never in a pipe."""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
import threading

import pytest
import torch

import flopcount
from flopcount.progress import MIN_ITEMS, wants_bar

pytest.importorskip("tqdm")


def write_trace(out, steps):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with flopcount.meter(str(out), backend="dispatch", flush_every=1) as m:  # one part per step
        for _ in range(steps):
            model(torch.ones(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            m.step()


def test_bar_only_on_a_terminal_and_for_long_work():
    master, slave = open_terminal()
    read_end, write_end = os.pipe()
    with open(slave, "w") as tty, open(write_end, "w") as pipe:
        assert wants_bar(MIN_ITEMS, tty, environ={})
        assert not wants_bar(MIN_ITEMS - 1, tty, environ={})
        assert not wants_bar(MIN_ITEMS, tty, environ={"FLOPCOUNT_PROGRESS": "0"})
        assert not wants_bar(MIN_ITEMS, pipe, environ={})
    os.close(master)
    os.close(read_end)


def open_terminal():
    """A real pseudo-terminal of 24 x 80 characters (a new pty has no size, and tqdm draws to its width)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return master, slave


def test_summarize_shows_a_bar_on_a_terminal(tmp_path):
    write_trace(tmp_path / "run", MIN_ITEMS)
    master, slave = open_terminal()
    terminal = []

    def drain():  # read while the child writes: a full pty buffer would block it
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the pty closed
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    result = subprocess.run([sys.executable, "-m", "flopcount.cli", "summarize", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=slave, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "FLOPCOUNT_PROGRESS"})
    os.close(slave)
    reader.join(10)
    os.close(master)
    terminal = b"".join(terminal)
    assert result.returncode == 0
    assert f"{MIN_ITEMS} steps" in result.stdout  # the summary itself is unchanged, on stdout
    assert b"reading steps" in terminal and f"/{MIN_ITEMS}".encode() in terminal
