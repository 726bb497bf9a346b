"""The benchmark behind ``experiments/compare.py`` and ``experiments/torchvision_check.py``.

It sits on top of everything (it imports the Lightning layer, the CLI, data and
models); nothing in ``nf_lightning.core`` imports it. One job per module:

- :mod:`~nf_lightning.benchmark.presets`: methods, presets and the rules' constants;
- :mod:`~nf_lightning.benchmark.curves`: validation curves, the deployable exit's crossing, convergence;
- :mod:`~nf_lightning.benchmark.stats`: means over seeds, times to target, speed-ups;
- :mod:`~nf_lightning.benchmark.provenance`: the code a run ran (commit, uncommitted changes) and the load during it;
- :mod:`~nf_lightning.benchmark.plan`: which runs, in which order, with which ``nf-train`` overrides;
- :mod:`~nf_lightning.benchmark.scheduler`: running them in subprocesses, reusing only runs of the same code;
- :mod:`~nf_lightning.benchmark.baselines`: the ``scratch_exit`` network and the ``depth_search`` rule;
- :mod:`~nf_lightning.benchmark.probe`: callbacks inside a run (loop time, test split, snapshots, stop at target);
- :mod:`~nf_lightning.benchmark.worker`: one run in its own process;
- :mod:`~nf_lightning.benchmark.summary`: the numbers of a summary from the runs' records;
- :mod:`~nf_lightning.benchmark.report`: the Markdown tables and the README section;
- :mod:`~nf_lightning.benchmark.measure`: budget, bare loops and inference throughput;
- :mod:`~nf_lightning.benchmark.cli`: ``compare.py``'s command line;
- :mod:`~nf_lightning.benchmark.unit_profile`: per-unit activation sizes and auxiliary-head FLOPs (``figures.py``);
- ``tv_models``, ``tv_rows``, ``tv_worker``, ``tv_report``: ``torchvision_check.py``'s module and stems, rows,
  one row in its own process, checks and table.

Example:
    >>> from nf_lightning.benchmark.presets import PRESETS
    >>> PRESETS["tiny_imagenet"]["data"]
    'tiny_imagenet'
"""
