"""Compressed gradient accumulation (Algorithm 1 of Flora), with an optional fused mode
that runs the optimizer step inside backward.

Over a cycle of ``tau`` micro-batches, a matrix parameter's gradient is compressed to
``C = sum_k G_k A^T`` (n x r) by a post-accumulate-grad hook the moment backward produces
it, and its full ``.grad`` is freed. On the cycle's last backward the hook writes the
estimate ``C A + G_tau`` into ``.grad`` (the last micro-batch enters exactly: its full
gradient exists at that moment anyway), and the next cycle draws a fresh projection.

With ``reduce=True`` the replicas of a data-parallel job sum their compressed (and dense)
buffers in one packed all-reduce at the end of each cycle, so that both the memory and the
traffic of a step are the compressed size (``docs/distributed.md``).

The parts, lowest first (``docs/accumulation.md``, "How it is built"): ``estimator``
(arithmetic over one parameter), ``cycle`` (the cycle's state), ``grads`` (the cycle seen
from ``.grad``), ``integrations`` (accelerate, the Trainer, wrapped optimizers, GradScaler),
``fused`` (stepping inside backward), ``replicas`` (``reduce=True``, DDP, FSDP2),
``options``, ``engine`` (what the hooks do), ``hooks``, ``checkpoint`` and the facade,
``accumulator``."""

from .accumulator import CompressedAccumulator
from .estimator import ACCUMULATION_PROJECTIONS, accumulate_compressed_, write_estimate_

__all__ = ["CompressedAccumulator", "accumulate_compressed_", "write_estimate_", "ACCUMULATION_PROJECTIONS"]
