"""Build hook for the optional native capture extension (csrc/).

All metadata lives in pyproject.toml. The extension is compiled on first use by
flopcount.capture.native (torch.utils.cpp_extension.load), against whatever torch is
already installed, so installing flopcount never pulls or builds against a second torch.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithNativeSource(build_py):
    """Ship csrc/ inside the package (flopcount/capture/csrc/) so installed copies can build it."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "flopcount" / "capture" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in [*Path(__file__).parent.joinpath("csrc").glob("*.cpp"), *Path(__file__).parent.joinpath("csrc").glob("*.h")]:
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithNativeSource})
