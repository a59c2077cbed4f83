"""The repository's scripts (not part of the installed package; see docs/testing.md, "What
scripts/ holds"):

- the entry points, at the top: ``train.sh``, ``test.sh``, ``setup.sh``, ``lint.sh``,
  ``submit_job.sh``, ``gpu_check.sh``;
- ``bench/``: the benchmarks (``bench_*.py``, the ``bench_ep`` package, ``dispatch_traffic.py``),
  their parts (``netbench/``, ``scale/``) and ``results.py``, the schema and recording of their JSON
  lines in ``results/``;
- ``experiments/``: one-off studies behind a design decision;
- ``tools/``: utilities: rendering the results pages, the network-namespace cluster, the one-GPU
  check, the outside probes, the activation-memory table;
- ``examples/``: a driver on moetrain's Python API;
- ``helpers.py``: the helpers they (and the tests) share, each defined once.

Run a script as a module from the repository root (``python -m scripts.bench.bench_zero``) or by
path from anywhere (``python scripts/bench/bench_zero.py``).
"""
