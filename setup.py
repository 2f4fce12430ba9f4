"""Build hook for the optional native capture extension (csrc/).

All metadata lives in pyproject.toml. The extension is compiled on first use by
flopcount.capture.native (torch.utils.cpp_extension.load), against whatever torch is
already installed, so installing flopcount never pulls or builds against a second torch.
"""
from setuptools import setup

setup()
