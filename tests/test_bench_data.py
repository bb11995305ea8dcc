"""The benchmark's held-out splits (flora.bench.data)."""

from __future__ import annotations

import pytest

from flora.bench import data


@pytest.mark.xfail(strict=True, reason="known, not yet fixed (probe Z85, 2026-12-06): the BBC corpus holds 98 "
                   "texts more than once and bbc_splits() shuffles articles, not distinct texts, so 14 test and "
                   "16 val articles are word for word in train. A fix changes every split, hence every published "
                   "classify, pretrain and suite figure: it needs the runs again")
def test_no_held_out_article_appears_in_training():
    splits = data.bbc_splits()
    train = {text for text, _ in splits["train"]}
    leaked = {k: sum(text in train for text, _ in splits[k]) for k in ("val", "test")}
    assert leaked == {"val": 0, "test": 0}
