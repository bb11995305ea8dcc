"""Every Flora measurement behind one entry point, ``flora-bench`` (``python -m flora.bench``,
``make bench``), on real models and text that ship inside packages:

- ``train`` (the default): Flora trained side by side with AdamW, Adafactor, LoRA, GaLore,
  APOLLO and the authors' flora-opt, each optimizer's lr picked on a validation split;
- ``step``: one optimizer step on SmolLM2-135M's shapes, time and state bytes;
- ``accum-memory``: peak memory, step time and quality of compressed gradient accumulation.

Layout: ``__main__`` dispatches the subcommands (``train``, ``step``, ``accum``); ``core``
holds what they share (offline environment, package lookup, measurement, run metadata,
Markdown tables); ``config`` the settings as data (sizes, lr grids, goals); ``optimizers``
parses optimizer names and builds them; ``data`` the offline text and its one BBC split;
``tasks``, ``records``, ``runner`` and ``report`` the training benchmark's tasks, typed
records, measured runs and outputs. See ``flora-bench --help``."""
