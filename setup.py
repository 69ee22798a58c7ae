"""Everything is in pyproject.toml but one file, which setuptools cannot declare there."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "gpt2engine-lm-eval.pth"


class BuildWithLmEvalHook(build_py):
    """Install gpt2engine-lm-eval.pth beside the package: at interpreter start it registers the
    `gpt2engine` model with lm_eval, only in the `lm_eval` command (lm_eval has no plugin hook)."""

    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("src") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithLmEvalHook})
