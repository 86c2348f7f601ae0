"""What `pip install .` puts on a machine: every module of the source tree, and a command that runs from
anywhere (not only from the repository, where the source tree shadows the installed package)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from setuptools import find_packages

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_module_directory_is_a_package():
    packages = set(find_packages(str(REPO), include=["edgemoe", "edgemoe.*"]))
    dirs = {str(p.parent.relative_to(REPO)).replace(os.sep, ".") for p in (REPO / "edgemoe").rglob("*.py")}
    assert dirs <= packages, f"directories with modules but no __init__.py: {sorted(dirs - packages)}"


def test_the_installed_command_runs_outside_the_repository(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-m", "edgemoe", "run", "-p", "The king said", "-n", "3", "--temp", "0"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
