"""What a source distribution carries: its tests must run from it (setuptools takes only
``tests/test_*.py`` by itself, so conftest.py and the helpers the tests import were left
out and collection failed: a probe), and the README's two commands need the constraints
file and the Makefile."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

import flora

ROOT = Path(__file__).resolve().parent.parent


def _tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_the_sdist_carries_every_test_module_and_the_set_up(tmp_path):
    build = ("from setuptools import build_meta as b; import sys; "
             "print(b.build_sdist(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    name = out.stdout.split()[-1]
    with tarfile.open(tmp_path / name) as t:
        inside = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    wanted = _tracked("tests", "docs/*.md", "examples") + ["constraints.txt", "Makefile", "LICENSE", ".ci/run"]
    missing = [f for f in wanted if f not in inside]
    assert not missing, f"missing from the sdist: {missing}"


def test_the_version_is_the_distributions():
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert flora.__version__ == tomllib.load(f)["project"]["version"]
