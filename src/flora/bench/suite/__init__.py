"""The selection suite (issue 17): the kinds of task (workloads.TASKS: eleven) on which a Flora default must hold.

- :mod:`.data` builds one portable folder of data and weights (``prepare``) from the
  offline packages, so that the suite can run where those packages are not installed
  (a GPU machine with only torch and transformers);
- :mod:`.workloads`: the tasks, one interface (build the model, a batch per step, an
  evaluation);
- :mod:`.space`: what is compared, as data: candidates, ranks, lr grids, seeds;
- :mod:`.runner`: one run, and a pool of worker processes with a JSONL log that
  ``--resume`` continues;
- :mod:`.score`: scoring apart from running: lr chosen on validation, test mean and
  std over seeds, the worst case over tasks of loss / floor's loss, the win matrix,
  plots.
"""
