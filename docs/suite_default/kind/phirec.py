"""Diagnostic (issue 17): record the 'scaled' complement weight |M_new| / ((1 - beta^t) |C(k u)|)
that the default form ('floored') raises to at least 0.4, and append its median and 10% / 90%
quantiles over the last 40% of the run's calls to the file $PHIREC_OUT (a JSON line)."""
import atexit
import json
import os
import statistics

import flora.momentum as fm

RECORD = []
_scale = fm.complement_scale_t


def _recorded(c_norm, cu_norm, bias_correction):
    phi = _scale(c_norm, cu_norm, bias_correction)
    RECORD.append([float(x) for x in phi.detach().flatten()])
    return phi


def install(tag: str) -> None:
    fm.complement_scale_t = _recorded  # compressed_apply_ looks it up in the module each step

    def dump():
        vals = sorted(v for call in RECORD[int(len(RECORD) * 0.6):] for v in call)
        if vals:
            with open(os.environ.get("PHIREC_OUT", "phi.jsonl"), "a") as f:
                f.write(json.dumps(dict(tag=tag, calls=len(RECORD), median=statistics.median(vals),
                                        q10=vals[len(vals) // 10], q90=vals[9 * len(vals) // 10])) + "\n")
    atexit.register(dump)
