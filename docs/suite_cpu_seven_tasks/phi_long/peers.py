"""The quality-against-state plane on the runs that resolve the floor-to-target gap (issue
17): the peers of runs_peers.jsonl (AdamW, torchao's and bitsandbytes' 8-bit AdamW,
Adam-mini, APOLLO-Mini; 3 seeds, 5 lrs) beside the floor, the target and the default
('floor0.4' = momentum_form="floored", its momentum in float32: the default until
2026-12-02) at r8 and r32 of table.py's runs, each at its lr with the best mean
validation loss; and the default since 2026-12-02, its momentum in bfloat16 rounded
stochastically (runs_dtype_sr.jsonl, the same seeds and lr grid; momentum_dtype="auto",
"bfloat16" on these tasks). tokenlm (fifteenth session) has every row from
../../suite_default/runs_tokenlm.jsonl, the default only (no float32 rows), and no
bitsandbytes row; its floor-to-target gap is not resolved, but there every peer holds
more state than Flora r32, so the plane is decided without it. For every peer with less state
than a Flora row, the paired test-loss difference (peer - Flora): a peer dominates when it
is below zero by more than one std. Writes peers.md, peers.csv and peers_loss_vs_state.png
beside this file."""
import collections, json, statistics as st
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker

from table import best, by, here, write

TASKS = (("newslm", 2.0), ("cnnstream", 4.0), ("tabstream", 4.0),  # the resolved runs
         ("tokenlm", 1.0))  # and tokenlm, every row from ../../suite_default/runs_tokenlm.jsonl
PEERS = ("adamw", "adamw-8bit", "adamw-8bit-bnb", "adam-mini", "apollo-mini")
peer_by = collections.defaultdict(dict)
for line in open(here / "runs_peers.jsonl"):
    r = json.loads(line)
    peer_by[(r["task"], r["scale"], None, r["row"])].setdefault(r["lr"], {})[r["seed"]] = r
by.update(peer_by)
for line in open(here / "runs_dtype_sr.jsonl"):  # the default form with a bfloat16 momentum, rounded stochastically
    r = json.loads(line)
    by[(r["task"], r["scale"], r["rank"], "bf16-sr")].setdefault(r["lr"], {})[r["seed"]] = r
for line in open(here.parent.parent / "suite_default" / "runs_tokenlm.jsonl"):  # floor, target, default, peers
    r = json.loads(line)
    row, rank = r["row"], None
    if row == "default":
        row, rank = "bf16-sr", r["rank"]
    by[(r["task"], r["scale"], rank, row)].setdefault(r["lr"], {})[r["seed"]] = r
# The Flora rows a peer is compared with: (label, rank, row)
FLORA = [(f"Flora r{rank}{suffix}", rank, row)
         for suffix, row in ((" fp32 (default until 2026-12-02)", "floor0.4"), (" (default)", "bf16-sr"))
         for rank in (8, 32)]

rows = []  # task, label, lr, edge, seeds, state bytes
for task, scale in TASKS:
    for label, key in ([("floor (Adafactor beta1=None)", (task, scale, None, "adafactor")),
                        ("target (Adafactor beta1=0.9)", (task, scale, None, "adafactor-b0.9"))]
                       + [(label, (task, scale, rank, row)) for label, rank, row in FLORA]
                       + [(p, (task, scale, None, p)) for p in PEERS]):
        b = best(key)
        if b:
            lr, seeds, edge = b
            state = next(iter(seeds.values()))["state_bytes"]
            rows.append(dict(task=task, label=label, lr=lr, edge=edge, seeds=seeds, state=state))

adamw = {r["task"]: r["state"] for r in rows if r["label"] == "adamw"}
lines = ["| task | optimizer | lr | state bytes (of AdamW's) | test loss | "
         + " | ".join(f"vs {label} (paired, if less state)" for label, _, _ in FLORA) + " |",
         "| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(FLORA)]
table = []
for r in rows:
    t = [r["seeds"][s]["test_loss"] for s in sorted(r["seeds"])]
    cells = []
    for flora, _, _ in FLORA:
        f = next((x for x in rows if x["task"] == r["task"] and x["label"] == flora), None)
        if f is None or r["label"].startswith(("Flora", "floor", "target")) or r["state"] >= f["state"]:
            cells.append("")
            continue
        d = [r["seeds"][s]["test_loss"] - f["seeds"][s]["test_loss"] for s in sorted(r["seeds"])]
        m, sd = st.mean(d), st.stdev(d)
        cells.append(f"{m:+.4f} ± {sd:.4f}" + (" **dominates**" if m < -sd else ""))
    share = r["state"] / adamw[r["task"]] if r["task"] in adamw else float("nan")
    edge = f" ({r['edge']} edge)" if r["edge"] else ""
    lines.append(f"| {r['task']} | {r['label']} | {r['lr']:g}{edge} | {r['state']:,} ({share:.1%}) | "
                 f"{st.mean(t):.4f} ± {st.stdev(t):.4f} | " + " | ".join(cells) + " |")
    table.append(dict(task=r["task"], optimizer=r["label"], lr=r["lr"], lr_edge=r["edge"], state_bytes=r["state"],
                      state_of_adamw=round(share, 4), test_loss_mean=st.mean(t), test_loss_std=st.stdev(t),
                      **{f"vs_flora_r{rank}" + ("_fp32" if row == "floor0.4" else ""): c
                         for (_, rank, row), c in zip(FLORA, cells)}))
write("peers", lines, table)

fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4))
# one colour per optimizer in every panel (tokenlm has no float32 Flora rows)
COLOURS = {label: f"C{i}" for i, label in enumerate([f for f, _, _ in FLORA] + list(PEERS))}
for ax, (task, _) in zip(axes, TASKS):
    for r in (x for x in rows if x["task"] == task):
        t = [s["test_loss"] for s in r["seeds"].values()]
        style = dict(marker="*", markersize=12) if r["label"].startswith("Flora") else dict(marker="o")
        if r["label"].startswith(("floor", "target")):
            ax.axhline(st.mean(t), ls="--" if r["label"].startswith("floor") else ":", color="gray", lw=1)
            ax.annotate(r["label"].split(" (")[0], (1, st.mean(t)), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="gray")
            continue
        ax.errorbar([r["state"]], [st.mean(t)], yerr=[st.stdev(t)], label=r["label"], capsize=3,
                    color=COLOURS[r["label"]], **style)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("optimizer state, bytes (log)")
    ax.set_ylabel("test loss (3 seeds, best lr)")
    ax.set_title(task)
axes[0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(here / "peers_loss_vs_state.png", dpi=120)
