#!/usr/bin/env bash
# How often examples/fused_replicas.py (or a copy of it) aborts at exit under FSDP2 (gloo,
# 2 CPU processes): the count behind
# docs/distributed.md's "5 runs of 72 ... none of 94" (2026-12-06, torch 2.13).
#   docs/gloo_exit_aborts.sh examples/fused_replicas.py 40            # with the kept handles
#   git show 0d555fb:examples/fused_replicas.py > /tmp/before.py
#   PYTHONPATH=examples docs/gloo_exit_aborts.sh /tmp/before.py 40    # without them
# A run counts as an abort when its exit status is not 0 and its stderr says
# 'terminate called without an active exception'.
set -u
script=${1:?script}; runs=${2:-20}
py=${PYTHON:-.venv/bin/python}
aborts=0; other=0
for i in $(seq 1 "$runs"); do
  err=$(OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 timeout 300 "$py" -m torch.distributed.run --standalone \
        --nproc_per_node 2 "$script" --wrap fsdp2 --steps 5 2>&1 >/dev/null) && continue
  if grep -q "terminate called without an active exception" <<<"$err"; then aborts=$((aborts + 1)); else other=$((other + 1)); fi
done
echo "$script: $aborts aborts at exit, $other other failures, in $runs runs"
