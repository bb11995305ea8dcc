"""flora-bench step at the smoke size: every optimizer timed, state bytes as flora counts
them, the projection-cost section through public API, metadata in the results."""

import json
import math
import platform
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import flora  # noqa: E402
from flora.bench import core, malloc, report  # noqa: E402
from flora.bench.__main__ import main  # noqa: E402
from flora.bench.config import Goal  # noqa: E402
from flora.bench.step import SIZES, optimizer_names  # noqa: E402


@pytest.fixture(scope="module")
def step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("step")
    # --malloc as-is: mallopt acts on the whole pytest process and cannot be undone
    assert main(["step", "--size", "smoke", "--repeats", "2", "--warmup", "1", "--dense-flora", "--threads", "1",
                 "--malloc", "as-is", "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_every_optimizer_is_timed(step_run):
    res, md = step_run
    names = [r["optimizer"] for r in res["rows"]]
    # flora-opt is left out (with a message) where it is not installed
    expected = ["adamw", "adamw:fused", "adafactor", "adafactor-b0.9", "flora-dense", "flora-r4", "flora-r4-exact",
                "flora-r4-paper", "flora-r8", "flora-r8-exact", "flora-r8-paper", "flora-r4:grouped", "flora-r8:grouped",
                "flora-r4:nomomentum"]
    assert names[:len(expected)] == expected
    ref = next(r for r in res["rows"] if r["optimizer"] == "adafactor-b0.9")  # what Flora replaces
    for r in res["rows"]:
        assert len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
        assert r["median_step_s"] == pytest.approx(statistics.median(r["times_s"]))
        # each row's time against the reference's (not against its own or AdamW's)
        assert r["step_vs_reference"] == pytest.approx(r["median_step_s"] / ref["median_step_s"])
        assert r["cpu_vs_reference"] == pytest.approx(r["median_cpu_s"] / ref["median_cpu_s"])
    assert "| flora-r4 |" in md and "Cost of drawing projections" in md
    split = {r["optimizer"]: r for r in res["split"]}  # the step's parts against their floors
    assert split["flora-r4"]["adafactor_floor_s"] > 0 and split["flora-r4"]["projection_floor_s"] > 0
    assert split["flora-r8"]["projection_floor_s"] == pytest.approx(2 * split["flora-r4"]["projection_floor_s"],
                                                                    rel=0.01)  # same shapes compressed at r4, r8
    assert "against its floor" in md


def test_state_bytes_are_flora_counts(step_run):
    res, _ = step_run
    shapes = [tuple(s) for s in res["meta"]["shapes"]]
    assert sum(math.prod(s) for s in shapes) == res["meta"]["n_params"]
    rows = {r["optimizer"]: r for r in res["rows"]}
    for name, rank in (("flora-r4", 4), ("flora-r4-paper", 4), ("flora-r8", 8), ("flora-dense", None)):
        assert rows[name]["state_bytes"] == flora.flora_state_bytes(shapes, rank=rank, beta1=0.9), name
    for name, r in rows.items():
        assert r["state_vs_adamw"] == pytest.approx(r["state_bytes"] / rows["adamw"]["state_bytes"]), name
    # what the optimizers keep, in order: Adafactor's factored second moment alone; plus a
    # momentum compressed at r4, at r8; plus a dense momentum (Flora's, HF's); AdamW's two
    # dense moments
    state = {name: r["state_bytes"] for name, r in rows.items()}
    assert (state["adafactor"] < state["flora-r4"] < state["flora-r8"] < state["flora-dense"]
            <= state["adafactor-b0.9"] < state["adamw"]), state
    assert state["flora-r4:nomomentum"] < state["flora-r4"] == state["flora-r4-exact"] == state["flora-r4:grouped"]


def test_the_projection_cache_is_shown_beside_the_state(step_run):
    """(Probe Z44.) The state columns leave out the projections Flora caches by default,
    which flora-opt keeps in its state: the table shows them, and state with them."""
    res, md = step_run
    rows = {r["optimizer"]: r for r in res["rows"]}
    assert rows["flora-r4"]["cache_bytes"] > 0 and rows["adamw"]["cache_bytes"] == 0
    assert rows["flora-r4"]["with_cache_vs_adamw"] == pytest.approx(
        (rows["flora-r4"]["state_bytes"] + rows["flora-r4"]["cache_bytes"]) / rows["adamw"]["state_bytes"])
    assert "| cache MiB | with cache / AdamW |" in md and "cache MiB: the projections flora.Flora keeps" in md


def test_projection_cost(step_run):
    res, _ = step_run
    pc = res["projection_cost"]
    assert [r["rank"] for r in pc] == list(SIZES["smoke"].ranks)
    for r in pc:
        opt = flora.Flora([__import__("torch").zeros(s) for s in res["meta"]["shapes"]], lr=1e-3, rank=r["rank"],
                          beta1=0.9)
        assert r["projections_per_step"] == sum(row["compressed"] for row in opt.plan())
        for k in ("step_drawn_s", "step_cached_s", "draw_all_s", "draw_all_device_native_s"):
            assert r[k] > 0, k
        assert r["cache_bytes"] > 0  # the cached run did keep its projections
        assert r["draw_fraction_of_step"] == r["draw_all_s"] / r["step_drawn_s"]


def test_metadata(step_run):
    meta = step_run[0]["meta"]
    assert set(core.META_KEYS) <= set(meta)
    assert meta["subcommand"] == "step" and meta["command"].startswith("flora-bench step --size smoke")
    assert meta["flora"] == flora.__version__ and meta["repeats"] == 2
    assert meta["malloc"]["policy"] == "as-is" and meta["malloc"]["mmap_threshold"] is None
    # seconds to 4 significant digits: three decimals read 0.000 at this size (probe Z134)
    for r in step_run[0]["rows"]:
        assert f"| {r['median_step_s']:.4g} |" in step_run[1], r["optimizer"]
    assert "--malloc as-is: glibc's dynamic allocator thresholds" in step_run[1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_default_malloc_policy_sets_glibcs_thresholds(tmp_path):
    """In a process of its own (the setting cannot be undone): glibc takes both values."""
    code = ("import json, os; os.environ.pop('LD_PRELOAD', None); from flora.bench import malloc; "
            "print(json.dumps(malloc.apply(malloc.DEFAULT)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record == {"policy": "warm", "mmap_threshold": 32 << 20, "trim_threshold": 64 << 20}
    assert malloc.describe(record) == "--malloc warm: glibc's mmap threshold 32 MiB, trim threshold 64 MiB"


def test_malloc_policies_set_both_thresholds_or_say_why_not(monkeypatch):
    calls = []

    def mallopt(param, value):
        calls.append((param, value))
        return 1

    assert malloc.apply("reuse", mallopt) == {"policy": "reuse", "mmap_threshold": 1 << 30,
                                              "trim_threshold": 2**31 - 1}
    assert calls == [(malloc.M_MMAP_THRESHOLD, 1 << 30), (malloc.M_TRIM_THRESHOLD, 2**31 - 1)]
    calls.clear()
    assert malloc.apply("as-is", mallopt)["mmap_threshold"] is None and calls == []  # nothing set
    refused = malloc.apply("warm", lambda param, value: 0)
    assert refused["not_applied"] == f"mallopt refused mmap_threshold={32 << 20}"
    assert "not applied: mallopt refused" in malloc.describe(refused)
    assert "not recorded" in malloc.describe(None)  # a result written before the option
    with pytest.raises(ValueError, match="malloc policy must be one of warm, reuse, as-is, got 'fast'"):
        malloc.apply("fast", mallopt)
    # the trim threshold refused after the mmap threshold was set: said as partly applied
    partial = malloc.apply("warm", lambda param, value: int(param == malloc.M_MMAP_THRESHOLD))
    assert partial["mmap_threshold"] == 32 << 20 and partial["trim_threshold"] is None
    assert "warm partly not applied: mallopt refused trim_threshold" in malloc.describe(partial)
    # another libc: nothing set, said
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    other = malloc.apply("warm")
    assert other["not_applied"] == "not glibc (unknown libc)" and other["mmap_threshold"] is None
    # an allocator preloaded in glibc's place may ignore mallopt: the record and the report say so
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    preloaded = malloc.apply("reuse", mallopt)
    assert preloaded["ld_preload"] == "/usr/lib/libjemalloc.so.2"
    assert "(LD_PRELOAD=/usr/lib/libjemalloc.so.2: a preloaded allocator may ignore them)" in malloc.describe(preloaded)


def test_step_goal_is_data():
    by = {"adamw": {"state_vs_adamw": 1.0, "median_step_s": 0.1},
          "adafactor-b0.9": {"state_vs_adamw": 0.5, "median_step_s": 0.2},
          "flora-r32": {"state_vs_adamw": 0.03, "median_step_s": 0.22}}
    goal = Goal(("flora-r32",), max_state_vs_adamw=0.05, max_step_vs=("adafactor-b0.9", 1.0))
    # each check says met or NOT met, as the quality checks do (probe Z44: '(> 1x)' was easy to misread)
    assert report.goal_parts(goal, "flora-r32", by) == ["state 3.0% of AdamW (goal: at most 5%: met)",
                                                        "step 1.10x adafactor-b0.9's (goal: at most 1x: NOT met)"]
    by["flora-r32"]["with_cache_vs_adamw"] = 0.06  # step's rows count the cache too: judged with it
    assert report.goal_parts(goal, "flora-r32", by)[0] == (
        "state 3.0% of AdamW, 6.0% with the projection cache (goal: at most 5%, cache included: NOT met)")


def test_default_names():
    class A:
        optimizers, dense_flora, no_flora_opt, ranks, forms = None, False, False, (8, 32), ("exact", "paper")

    assert optimizer_names(A) == ["adamw", "adamw:fused", "adafactor", "adafactor-b0.9", "flora-r8-exact",
                                  "flora-r8-paper", "flora-r32-exact", "flora-r32-paper", "flora-r8-exact:grouped",
                                  "flora-r32-exact:grouped", "flora-r8-exact:nomomentum", "flora-opt-r8", "flora-opt-r32"]
    A.forms = ("floored-orthonormal", "exact")  # Flora's default form is the bare name
    assert optimizer_names(A)[4:8] == ["flora-r8", "flora-r8-exact", "flora-r32", "flora-r32-exact"]


def test_step_rows_whose_flora_rank_compresses_nothing_are_marked():
    """flora-bench step: a flora-rR row at a rank >= every projected dim is marked in the
    JSON and the table (issue 16, item 12); a few tiny steps, well under a second."""
    import torch

    from flora.bench import step

    params = [torch.randn(16, 16, requires_grad=True), torch.randn(16, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Flora's own warning that nothing is compressed
        rows = step.time_optimizers(["adafactor-b0.9", "flora-r4", "flora-r16", "flora-dense"], params, grads, "cpu",
                                    warmup=0, repeats=1, seed=0)
    marked = {r["optimizer"]: r["compresses_nothing"] for r in rows}
    assert marked == {"adafactor-b0.9": False, "flora-r4": False, "flora-r16": True, "flora-dense": False}
    meta = {"model": "m", "device_name": "cpu", "command": "flora-bench step", "n_tensors": 2, "n_params": 272,
            "shapes_check": "-", "repeats": 1, "warmup": 0}
    md = step.render({"meta": {**meta, **{k: "" for k in core.META_KEYS if k not in meta}}, "rows": rows})
    line = next(x for x in md.splitlines() if x.startswith("| flora-r16 |"))
    assert step.NOTHING_COMPRESSED in line
    # the step split leaves it out, and says so (it had vanished from that table silently)
    rates = {"copy_bytes_per_s": 1e9, "gemm_flops_per_s": 1e9}
    split = step.step_split(rows + [{"optimizer": "flora-r4:nomomentum", "median_step_s": 1e-4}], params,
                            {"flora-r4": (4, 256), "flora-r16": (16, 0)}, rates)
    assert [r["optimizer"] for r in split] == ["flora-r4"]
    md = step.render({"meta": {**meta, **{k: "" for k in core.META_KEYS if k not in meta}}, "rows": rows,
                      "split": split, "rates": rates})
    assert "Not split: flora-r16 (compresses nothing: no projection part)." in md
    assert step.NOTHING_COMPRESSED not in next(x for x in md.splitlines() if x.startswith("| flora-r4 |"))


def test_ops_per_step_counts_top_level_operations():
    """ops_per_step: aten operations not nested in another (fused AdamW's step is its one
    kernel and the step counters' increment), a CPU proxy for kernel launches."""
    import torch

    from flora.bench import step

    params = [torch.randn(8, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    opt.step()
    assert step.ops_per_step(opt.step) == 2
    assert step.ops_per_step(lambda: torch.ones(3).add_(1).mul_(2)) == 3


def test_compiled_rows(monkeypatch):
    """:compiled rows (aot_eager here, for speed; the bench compiles with inductor): Flora
    compile=..., torch AdamW and HF Adafactor under torch.compile(opt.step); each row has
    its ops per step, its first step (compile) apart, the graphs and breaks dynamo
    counted; Flora's and AdamW's compile nothing after their first step; the goals are
    checked where their rows ran."""
    import torch

    from flora.bench import step

    monkeypatch.setattr(step, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    params = [torch.randn(16, 24, requires_grad=True), torch.randn(16, 24, requires_grad=True),
              torch.randn(24, requires_grad=True)]
    grads = [torch.randn_like(p) for p in params]
    names = ["adamw", "adafactor-b0.9", "flora-r4", "adamw:compiled", "adafactor-b0.9:compiled", "flora-r4:compiled",
             "flora-r4:compiled-step"]
    rows = {r["optimizer"]: r for r in step.time_optimizers(names, params, grads, "cpu", warmup=1, repeats=2, seed=0)}
    for name in names:
        assert rows[name]["ops_per_step"] > 0, name
    for name in ("adamw:compiled", "flora-r4:compiled", "flora-r4:compiled-step"):
        r = rows[name]
        assert r["graphs"] >= 1 and r["graphs_after_first_step"] == 0 and r["first_step_s"] > 0, name
    assert rows["flora-r4:compiled"]["graph_breaks"] == 0  # fullgraph per bucket
    assert rows["flora-r4:compiled"]["graphs"] == 2  # (16, 24) x 2 and (24,)
    assert rows["flora-r4:compiled-step"]["graphs"] == 1  # torch.compile(opt.step): one graph after the prelude
    assert "compile_s" not in rows["flora-r4"]
    by = {n.replace("r4", "r32"): dict(r, optimizer=n.replace("r4", "r32")) for n, r in rows.items()}
    goals = step.compiled_goals(by)
    assert len(goals) == 6 and goals[0].startswith("flora-r32:compiled: step ") and "adafactor-b0.9" in goals[0]
    assert any("ops dispatched per step" in g for g in goals) and any("compiles in" in g for g in goals)
    assert any("compiles in" in g and "cache empty" in g for g in goals)
    warm = step.compiled_goals(by, cold=False)  # TORCHINDUCTOR_CACHE_DIR given: may be warm, not checked
    assert len(warm) == 6 and any("compiles in" in g and "not checked" in g and "MISSED" not in g for g in warm)
    pre = step.compiled_goals(by, "pretrain")  # the pretrain model: one goal, 1.0x HF Adafactor
    assert len(pre) == 1 and "adafactor-b0.9" in pre[0] and "goal <= 1x" in pre[0]
    assert step.compiled_goals(by, "smoke") == []
    # a Flora(compile=True) row that compiled nothing (CUDA parameters step eagerly): said, its goals unchecked
    eager = {**by, "flora-r32:compiled": dict(by["flora-r32:compiled"], graphs=0)}
    for size in ("quick", "pretrain"):
        said = [g for g in step.compiled_goals(eager, size) if g.startswith("flora-r32:compiled:")]
        assert said == ["flora-r32:compiled: compiled no graph (stepped eagerly: on CUDA unless FLORA_COMPILE_CUDA=1); "
                        "its goals not checked"], size
    md = step.render({"meta": {"model": "m", "device_name": "cpu", "command": "flora-bench step", "n_tensors": 3,
                               "n_params": 792, "shapes_check": "-", "repeats": 2, "warmup": 1,
                               **{k: "" for k in core.META_KEYS if k not in ("model", "command")}},
                      "rows": list(rows.values())})
    assert "## Compiled steps" in md and "| flora-r4:compiled |" in md and "ops / step" in md
    assert "workspace MiB" in md and rows["flora-r4"]["workspace_bytes"] == rows["adamw"]["workspace_bytes"] == 0


@pytest.mark.parametrize("env", ["unset", "default", "given"])
def test_compiled_rows_compile_into_an_empty_cache(monkeypatch, tmp_path, env):
    """The bench times a first compile: with :compiled rows and TORCHINDUCTOR_CACHE_DIR
    unset or inductor's default (which inductor writes into it once used), inductor's
    cache is a new empty folder while the optimizers run, removed after, and the variable
    as it was again; a folder the user gives is used as it is (and the compile goal is not
    checked against it)."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from flora.bench import step

    monkeypatch.setattr(step, "COMPILE_BACKEND", "aot_eager")
    given = env == "given"
    if env == "unset":
        monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine") if given else default_cache_dir())
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    seen = []
    real = step.time_optimizers

    def spy(*a, **kw):
        seen.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        if not given:
            assert seen[-1] is not None and not os.listdir(seen[-1])  # empty when the optimizers start
        return real(*a, **kw)

    monkeypatch.setattr(step, "time_optimizers", spy)
    out = tmp_path / "out"
    assert main(["step", "--size", "smoke", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-flora-opt",
                 "--projection-cost", "off", "--optimizers", "adafactor-b0.9,flora-r4:compiled",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "results.json").read_text())["meta"]
    if given:
        assert seen == [str(tmp_path / "mine")] and meta["inductor_cache"] == "TORCHINDUCTOR_CACHE_DIR"
    else:
        assert meta["inductor_cache"] == "empty" and "flora-bench-inductor-" in seen[0]
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and not os.path.exists(seen[0])


def test_a_floor_above_the_measured_time_is_marked_not_printed_as_a_floor():
    """The projection-matmul "floor" came out above the measured projection part (a rate
    measurement disturbed by other work; found by a probe) and was printed as a floor. The
    split says which floors exceed what they bound, and the report marks them."""
    from flora.bench import step

    rows = [{"optimizer": "flora-r4:nomomentum", "median_step_s": 0.010},
            {"optimizer": "flora-r4", "median_step_s": 0.0111}, {"optimizer": "flora-r8", "median_step_s": 0.030}]
    params = [type("P", (), {"numel": lambda self: 1000})()]
    rates = {"copy_bytes_per_s": 1e9, "gemm_flops_per_s": 1e7}  # projection floors 4 r 1000 / 1e7: 1.6, 3.2 ms
    split = {r["optimizer"]: r for r in step.step_split(rows, params, {"flora-r4": (4, 1000), "flora-r8": (8, 1000)},
                                                        rates)}
    assert split["flora-r4"]["floor_above_measured"] == ["projection_floor_s"]  # 1.6 ms > its 1.1 ms part
    assert split["flora-r8"]["floor_above_measured"] == []  # 3.2 ms below its 20 ms part
    meta = {"model": "m", "device_name": "d", "command": "c", "n_tensors": 1, "n_params": 1000, "shapes_check": "x",
            "repeats": 2, "warmup": 1}
    md = step.render({"meta": meta, "rows": [], "split": list(split.values()), "rates": rates})
    line = next(x for x in md.splitlines() if x.startswith("| flora-r4 |"))
    assert line.count("(> measured)") == 1 and "**Note:** a floor above the measured time (flora-r4:" in md
    assert "(> measured)" not in next(x for x in md.splitlines() if x.startswith("| flora-r8 |"))


def test_verify_config_at_a_size_it_cannot_check_is_refused(capsys):
    """--verify-config checks SmolLM2-135M's shapes against its GGUF; at another --size it was
    ignored silently, the report still saying the shapes came from the published config."""
    with pytest.raises(SystemExit) as e:
        main(["step", "--size", "smoke", "--verify-config"])
    assert e.value.code == 2
    assert "--verify-config checks SmolLM2-135M's shapes" in capsys.readouterr().err


def test_baseline_rows_include_the_grouped_path(tmp_path):
    """--baseline-src times Flora's rows again from another copy of the package; the
    grouped path (a GPU's default) had no baseline row, so its operation count could not be
    compared side by side with an older commit."""
    import pathlib

    src = pathlib.Path(flora.__file__).parent
    out = tmp_path / "s"
    assert main(["step", "--size", "smoke", "--optimizers", "flora-r4:grouped,flora-r4:single", "--repeats", "1",
                 "--warmup", "1", "--no-flora-opt", "--projection-cost", "off", "--threads", "1",
                 "--baseline-src", str(src), "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    for name in ("flora-r4:grouped", "flora-r4:single"):
        assert rows["baseline:" + name]["ops_per_step"] == rows[name]["ops_per_step"]  # the same code


def _spy_on_build_all(monkeypatch) -> list:
    """The (label, optimizer) pairs flora-bench step builds, collected as it builds them."""
    from flora.bench import step as bstep

    built = []
    real = bstep.build_all

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        built.extend(out)
        return out

    monkeypatch.setattr(bstep, "build_all", spy)
    return built


def test_groups_per_tensor_builds_every_optimizer_with_a_group_per_tensor(tmp_path, monkeypatch):
    """``--groups per-tensor``: every optimizer (Flora, AdamW, HF Adafactor) gets one group per
    tensor, said in the metadata and the table; Flora's state is the same as with one group."""
    built = _spy_on_build_all(monkeypatch)
    out = tmp_path / "groups"
    assert main(["step", "--size", "smoke", "--repeats", "1", "--warmup", "1", "--threads", "1", "--projection-cost",
                 "off", "--no-flora-opt", "--optimizers", "adafactor-b0.9,adamw,flora-r4", "--groups", "per-tensor",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["groups"] == "per-tensor"
    assert "A parameter group per tensor" in (out / "results.md").read_text()
    n = res["meta"]["n_tensors"]
    assert built and all(len(o.param_groups) == n for _, o in built)
    one = tmp_path / "one"
    assert main(["step", "--size", "smoke", "--repeats", "1", "--warmup", "1", "--threads", "1", "--projection-cost",
                 "off", "--no-flora-opt", "--optimizers", "adafactor-b0.9,flora-r4", "--out", str(one)]) == 0
    state = {r["optimizer"]: r["state_bytes"] for r in json.loads((one / "results.json").read_text())["rows"]}
    assert {r["optimizer"]: r["state_bytes"] for r in res["rows"] if r["optimizer"] in state} == state


def test_groups_per_tensor_lr_gives_each_group_its_own_lr(tmp_path, monkeypatch):
    """``--groups per-tensor-lr``: a group per tensor, the i-th at lr * 0.99^i, for every
    optimizer (a per-layer lr decay taken to the tensor), said in the table."""
    from flora.bench import step as bstep

    built = _spy_on_build_all(monkeypatch)
    out = tmp_path / "lrs"
    assert main(["step", "--size", "smoke", "--repeats", "1", "--warmup", "1", "--threads", "1", "--projection-cost",
                 "off", "--no-flora-opt", "--optimizers", "adafactor-b0.9,flora-r4", "--groups", "per-tensor-lr",
                 "--out", str(out)]) == 0
    assert "the i-th at lr * 0.99^i" in (out / "results.md").read_text()
    for _, opt in built:
        lrs = [float(g["lr"]) for g in opt.param_groups]
        assert lrs == pytest.approx([bstep.LR * 0.99 ** i for i in range(len(lrs))])


# ---- the timing, memory and report arithmetic under a fake clock (probe Z84: 26 one-line
# mutants of these had passed every test; each case below fails on its own)


def _fake_clock(monkeypatch):
    """core.timed returns (k, 100 + k^2) for its k-th call: wall and CPU told apart."""
    import itertools

    count = itertools.count(1)

    def timed(fn, device):
        fn()
        k = next(count)
        return float(k), 100.0 + k * k

    monkeypatch.setattr(core, "timed", timed)


def test_step_rows_take_wall_and_cpu_medians_of_interleaved_rotated_rounds(monkeypatch):
    """One warm-up round (calls 1-3), then three rounds, each rotated by one: adamw gets
    calls 4, 9, 11 and adafactor-b0.9 (the reference) 5, 7, 12; an odd count tells a median
    from a mean; times_s is wall time, cpu_times_s CPU time."""
    import torch

    from flora.bench import step

    _fake_clock(monkeypatch)
    torch.manual_seed(0)
    params = [torch.randn(16, 16, requires_grad=True), torch.randn(16, requires_grad=True)]
    rows = step.time_optimizers(["adamw", "adafactor-b0.9", "flora-r4"], params, [torch.randn_like(p) for p in params],
                                "cpu", warmup=1, repeats=3, seed=0)
    by = {r["optimizer"]: r for r in rows}
    a = by["adamw"]
    assert a["times_s"] == [4.0, 9.0, 11.0] and a["cpu_times_s"] == [116.0, 181.0, 221.0]
    assert (a["median_step_s"], a["min_step_s"], a["median_cpu_s"]) == (9.0, 4.0, 181.0)
    assert by["adafactor-b0.9"]["times_s"] == [5.0, 7.0, 12.0] and by["flora-r4"]["times_s"] == [6.0, 8.0, 10.0]
    assert a["step_vs_reference"] == pytest.approx(9 / 7) and a["cpu_vs_reference"] == pytest.approx(181 / 149)
    assert step.median([1.0, 2.0, 10.0]) == 2.0


def test_the_first_step_and_later_compilations_are_kept_per_label(monkeypatch):
    """first[label]: the first warm-up step's (wall, cpu, graphs, breaks); later steps add
    their graphs (not their breaks) under (label, "later")."""
    import itertools

    from flora.bench import step

    calls = itertools.count(0)
    monkeypatch.setattr(step, "dynamo_counts", lambda: (lambda c: (c, 10 * c))(next(calls)))
    clock = itertools.count(1)
    runs = [(label, lambda: (lambda k: (float(k), 100.0 + k))(next(clock))) for label in "ab"]
    first = {}
    wall, cpu = step.interleaved_times(runs, warmup=2, repeats=3, first=first)
    assert first["a"] == (1.0, 101.0, 1, 10) and first["b"] == (2.0, 102.0, 1, 10)
    assert first["a", "later"] == 4 and first["b", "later"] == 4  # a warm-up and three timed steps each
    assert wall == {"a": [5.0, 8.0, 9.0], "b": [6.0, 7.0, 10.0]}
    assert cpu["a"] == [105.0, 108.0, 109.0]


def test_timed_measures_the_cpu_of_its_call_only(monkeypatch):
    """A clock of its own (no wall-clock limit): the process had spent 100 s of CPU before
    the call, which is not the call's."""
    import itertools
    import types

    ticks = itertools.count()
    monkeypatch.setattr(core, "time", types.SimpleNamespace(perf_counter=lambda: 10.0 + next(ticks),
                                                            process_time=lambda: 100.0 + 0.5 * next(ticks)))
    wall, cpu = core.timed(lambda: None, "cpu")
    assert (wall, cpu) == (2.0, 1.0)  # ticks 0, 1 before the call, 2, 3 after


def test_a_memory_reading_takes_cuda_over_rss_and_subtracts_the_start():
    m = core.MemoryReading(rss_start=100.0, rss_peak=200.0, rss_reset=True, cuda_start=5.0, cuda_peak=50.0)
    assert (m.peak, m.baseline, m.rss_over_start) == (50.0, 5.0, 100.0)
    m = core.MemoryReading(rss_start=100.0, rss_peak=130.0, rss_reset=True)
    assert (m.peak, m.baseline, m.rss_over_start) == (130.0, 100.0, 30.0)


def test_the_accumulation_memory_row_leaves_out_the_warm_up_cycle():
    """measured() runs cycle 0 untimed, then 1..steps; the row's peak is over the baseline and
    the gradients held are the measured cycles' (the warm-up's 9 MiB left out)."""
    import types

    import torch

    from flora.bench import accum_parts

    seen = []
    accum_parts.measured(lambda s: seen.append(s) or 0.0, 2, "cpu")
    assert seen == [0, 1, 2]
    p = torch.nn.Parameter(torch.zeros(4))
    job = types.SimpleNamespace(rank=4, fused=False, cfg=types.SimpleNamespace(batch=1, seq=8), steps=2,
                                optimizer="sgd")
    reading = core.MemoryReading(rss_start=100.0, rss_peak=130.0, rss_reset=True)
    row = accum_parts.memory_row(job, types.SimpleNamespace(tau=4), torch.optim.SGD([p], lr=0.1), None, 0, reading,
                                 [1.0, 2.0], [0.0, 0.0], device="cpu", held=[9 * core.MiB, 2 * core.MiB, 3 * core.MiB])
    assert (row["peak_over_baseline_mib"], row["grad_mib_at_step"]) == (30.0, 3.0)


def test_the_accumulation_report_divides_by_plain_and_compares_at_the_same_lr():
    from flora.bench import accum

    def memory(config, peak, t):
        return {"kind": "memory", "config": config, "status": "ok", "device": "cpu", "tau": 4, "batch": 1, "seq": 8,
                "optimizer": "x", "weights_mib": 1.0, "peak_mib": peak, "peak_over_baseline_mib": 1.0,
                "grad_mib_at_step": 0.0, "median_step_s": t}

    def quality(config, rank, lr, loss):
        return {"kind": "quality", "config": config, "status": "ok", "rank": rank, "lr": lr, "tau": 4, "steps": 2,
                "batch": 1, "seq": 8, "eval_sequences": 4, "val_loss_start": 5.0, "val_loss": loss, "test_loss": loss}

    res = {"meta": {"model": "m", "command": "c"}, "memory": [memory("plain", 200.0, 1.0), memory("r4", 100.0, 2.0)],
           "quality": [quality("q-dense@0.1", None, 0.1, 4.0), quality("q-r4@0.1", 4, 0.1, 4.2),
                       quality("q-dense@0.3", None, 0.3, 2.0), quality("q-r4@0.3", 4, 0.3, 2.1)], "noise": []}
    lines = accum.markdown(res).splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| config ")).strip("|").split("|")]
    r4 = dict(zip(header, (c.strip() for c in next(x for x in lines if x.startswith("| r4 ")).strip("|").split("|"))))
    assert (r4["peak / plain"], r4["step / plain"]) == ("0.500", "2.00")
    q = next(x for x in lines if x.startswith("| q-r4@0.3 "))
    assert "+5.00%" in q  # against the dense row of its own lr (2.0), not the other (4.0)


def test_the_floors_rates_and_projection_cost_follow_their_definitions(monkeypatch):
    """Adafactor's floor is 12 bytes per float32 parameter over the copy bandwidth; the
    projection's 2 r flops per compressed element, twice; a copy counts its bytes read and
    written and a matmul 2 flops per multiply-add; the cache's saving is over the drawing
    step's time; a cold compile under 60 s meets its goal."""
    import torch

    from flora.bench import step

    (split,) = step.step_split([{"optimizer": "flora-r4:nomomentum", "median_step_s": 0.010},
                                {"optimizer": "flora-r4", "median_step_s": 0.030}], [torch.zeros(1000)],
                               {"flora-r4": (4, 1000)}, {"copy_bytes_per_s": 1e9, "gemm_flops_per_s": 1e7})
    assert split["adafactor_floor_s"] == pytest.approx(1.2e-5) and split["projection_floor_s"] == pytest.approx(1.6e-3)
    # a rank that compresses nothing has no projection part (it printed as one, below 0: probe Z105)
    assert step.step_split([{"optimizer": "flora-r4:nomomentum", "median_step_s": 0.010},
                            {"optimizer": "flora-r9999", "median_step_s": 0.008}], [torch.zeros(1000)],
                           {"flora-r9999": (9999, 0)}, {"copy_bytes_per_s": 1e9, "gemm_flops_per_s": 1e7}) == []
    monkeypatch.setattr(core, "timed", lambda fn, device: (fn(), (1.0, 1.0))[1])
    assert step.device_rates("cpu", [(64, 16), (16,)], 4, repeats=3) == {"copy_bytes_per_s": 2.0 * 64 * 2**20,
                                                                        "gemm_flops_per_s": 2.0 * 4 * 64 * 16}
    _fake_clock(monkeypatch)
    torch.manual_seed(0)
    params = [torch.randn(16, 16, requires_grad=True), torch.randn(16, requires_grad=True)]
    (cost,) = step.projection_cost(params, [torch.randn_like(p) for p in params], "cpu", [4], "exact", warmup=1,
                                   repeats=3, seed=0)
    assert (cost["step_drawn_s"], cost["step_cached_s"]) == (6.0, 5.0)
    assert cost["step_fraction_saved_by_cache"] == pytest.approx(1 / 6)
    by = {"flora-r32:compiled": {"optimizer": "flora-r32:compiled", "median_cpu_s": 0.12, "median_step_s": 0.12,
                                 "graphs": 3, "ops_per_step": 10, "compile_s": 5.0},
          "adafactor-b0.9": {"optimizer": "adafactor-b0.9", "median_cpu_s": 0.10, "median_step_s": 0.10},
          "adamw": {"optimizer": "adamw", "median_cpu_s": 0.2, "median_step_s": 0.2}}
    (said,) = [x for x in step.compiled_goals(by, "quick", cold=True) if "compiles in" in x]
    assert said.endswith("met (goal < 60 s)")
