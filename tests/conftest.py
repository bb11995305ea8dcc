import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: the tests' tensors are tiny, and on a busy 2-core machine every parallel
# region of a second thread waits a scheduler tick (a tiny MLP forward: 20 ms at two
# threads, 0.02 ms at one). Spawned workers inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _threads_restored():
    """The bench sets torch's thread count in this process (a task's or --threads):
    every test module starts with the count the one before it found."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _accelerate_synced():
    """A test that stops a Trainer mid-accumulation (a refusal it expects) leaves accelerate's
    process-wide GradientState saying "not synced". CompressedAccumulator no longer takes
    such a leftover for a driver (tests/test_reliability.py), but each test still ends
    synced, as if it had a process of its own."""
    yield
    import sys

    shared = getattr(getattr(sys.modules.get("accelerate.state"), "GradientState", None), "_shared_state", None)
    if shared and not shared.get("sync_gradients", True):
        shared["sync_gradients"] = True


@pytest.fixture
def fresh_dynamo():
    """dynamo's caches and counters empty, one thread (tiny tensors: threads only add
    synchronisation), and no accumulator of an earlier test alive: one built without
    ``optimizer=`` keeps torch's global optimizer step hook until the garbage collector
    frees it (its hooks and parameters form a cycle), and torch.compile(opt.step) traces
    that hook too, breaking the graph in it (test_compile.py's break counts failed when such
    a test ran first in the same worker). dynamo's caches go first: an earlier test's
    compiled code may hold its accumulator alive (a sequential run failed so after
    test_accumulate's compiled short cycle). Used by every test that counts compilations."""
    import gc

    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from flora.accumulation.hooks import remove_dead_global_hooks

    dynamo.reset()
    gc.collect()
    remove_dead_global_hooks()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    counters.clear()
    yield
    dynamo.reset()
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """The tests and cases marked ``extended`` (``_configs.extended``) are skipped unless
    FLORA_TEST_ALL=1 (``_configs.run_all``; the README's paragraph on ``make test``). Each
    repeats a check that the default suite makes, on one more option, path or launch mode;
    the default suite keeps every stepping path, form, dtype and layout, and fits CI's 15
    minutes on 2 cores."""
    from _configs import run_all

    if run_all():
        return
    skip = pytest.mark.skip(reason="extended: repeats a default check on one more option, path or mode; "
                                   "FLORA_TEST_ALL=1 runs it")
    for item in items:
        if item.get_closest_marker("extended") is not None:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """What the imports and the collection made lives as long as the worker: frozen out of
    the collector's reach (gc.freeze), so that the collections a test asks for (conftest's
    fresh_dynamo, a dropped accumulator's) and the automatic ones skip half a million
    objects (0.3 s a full collection once transformers and dynamo are imported). Dynamo is
    imported first: the compile tests and DDP's constructor import it anyway."""
    import gc

    import torch._dynamo  # noqa: F401

    gc.collect()
    gc.freeze()
