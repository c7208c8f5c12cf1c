"""Build hook only (the metadata is in pyproject.toml): record the git commit in every wheel built from a
checkout, as ``kaggle_utils/_version.py`` (read by ``kaggle_utils.version.version_stamp``)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithCommit(build_py):
    """``build_py`` that also writes ``_version.py`` (the commit, or ``""`` without git) into the build."""

    def run(self) -> None:
        super().run()
        sys.path.insert(0, str(HERE))
        try:
            from kaggle_utils.version import git_commit
        finally:
            sys.path.pop(0)
        commit = git_commit(HERE) or ""
        target = Path(self.build_lib) / "kaggle_utils" / "_version.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('"""Written by setup.py when this package was built (kaggle_utils.version)."""\n\n'
                          f"COMMIT = {commit!r}\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
