"""Side-by-side training benchmark of Flora against AdamW, Adafactor, LoRA, GaLore, APOLLO
and the authors' flora-opt, on real models and text that ship inside packages.

Run it with ``python -m flora.bench`` (or ``flora-bench``, or ``make bench``); see
``python -m flora.bench --help``."""
