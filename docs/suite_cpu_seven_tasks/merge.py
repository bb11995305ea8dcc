"""(Run from the repo root, after the commands in docs/results.md.) One folder for the report: the six CPU tasks (i17b) with cnn/cnnstream's Flora rows from
suite-cpu-fd (factor_dims="largest", the default since 736b3ea) instead of i17b's (HF's "last"
rule then), newslm, and the peers."""
import json, pathlib
out = pathlib.Path("runs/suite-cpu-i17c"); out.mkdir(exist_ok=True)
rows = []
def load(p):
    p = pathlib.Path(p)
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
for r in load("runs/suite-cpu-i17b/runs.jsonl"):
    if r["task"] in ("cnn", "cnnstream") and r["optimizer"].startswith("flora-"):
        continue
    rows.append(r)
rows += load("runs/suite-cpu-fd/runs.jsonl") + load("runs/suite-newslm/runs.jsonl")
# the peers' folder began as a copy of the six-task runs: take only the peers from it
rows += [r for r in load("runs/suite-cpu-peers/runs.jsonl") if not r["optimizer"].startswith(("flora-", "adafactor"))]
seen, keep = set(), []
for r in rows:
    k = (r["task"], r["optimizer"], r["lr"], r["seed"], r.get("kappa", 1000))
    if k in seen: continue
    seen.add(k); keep.append(r)
(out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
print(len(keep), "runs")
adamw = {}
for d in ("runs/suite-cpu-i17b", "runs/suite-cpu-fd", "runs/suite-newslm"):
    p = pathlib.Path(d) / "adamw_state.json"
    if p.exists():
        adamw.update(json.loads(p.read_text()))
(out / "adamw_state.json").write_text(json.dumps(adamw))
