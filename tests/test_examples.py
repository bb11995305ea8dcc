"""The examples run as their docstrings say (``torchrun --nproc_per_node 2``, CPU
processes with gloo) and end as their docs show: replicas identical, every rank's weights
the same. They had been run by hand only (session 40 ran them; a probe, Z62, too)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from _configs import extended

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _torchrun(tmp_path, script: str, *args: str) -> str:
    """stdout of ``script`` under torchrun on 2 processes (a free port each: --standalone)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / script), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


# One launch per example by default (10-20 s each on 2 cores); the other modes under
# FLORA_TEST_ALL=1. tests/test_distributed_comm.py checks the accumulator across replicas
# and plain DDP, tests/test_distributed_fused.py fused mode under DDP, on gloo processes
# they start themselves (no torchrun).
@pytest.mark.parametrize("mode", ["hook", extended("acc"), extended("ddp")])
def test_ddp_compressed_example(tmp_path, mode):
    out = _torchrun(tmp_path, "ddp_compressed.py", "--mode", mode, "--steps", "10")
    assert f"mode={mode}" in out and "replicas identical: True" in out, out
    # the bytes docs/distributed.md's transcript shows are the ones it prints (probe Z136: the
    # first step's had gone stale when the option check grew)
    doc = (EXAMPLES.parent / "docs" / "distributed.md").read_text()
    shown = re.search(rf"^mode={mode} .*$", doc, re.M)
    bytes_of = re.compile(r"(\d+) bytes per step .*; first step (\d+) bytes")
    assert shown and bytes_of.search(shown[0]).groups() == bytes_of.search(out).groups(), (shown, out)


@pytest.mark.parametrize("wrap", [extended("ddp"), "fsdp2"])
def test_fused_replicas_example(tmp_path, wrap):
    out = _torchrun(tmp_path, "fused_replicas.py", "--wrap", wrap, "--steps", "5")
    assert f"wrap={wrap} world=2" in out and "gradients left 0" in out and "replicas identical: True" in out, out


def test_trainer_ddp_example(tmp_path):
    out = _torchrun(tmp_path, "trainer_ddp.py", "--steps", "10")
    sums = re.findall(r"rank (\d): world 2, train loss ([\d.]+), weights checksum ([-\d.]+)", out)
    assert sorted(r for r, _, _ in sums) == ["0", "1"], out
    assert len({(loss, s) for _, loss, s in sums}) == 1, out  # the ranks agree
