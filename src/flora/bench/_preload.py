"""Imported first by the benchmark's fork server: its preloaded imports (peft, and torchao
through it) run outside :func:`flora.bench.core.quiet`, and would print their chatter
once per server."""

from .core import quiet_loggers

quiet_loggers()
