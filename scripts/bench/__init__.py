"""The benchmarks: each prints a table, then one JSON line, and records it with ``results.py``
(``results/<bench>.jsonl``, rendered into docs/benchmarks.md by ``scripts/tools/render_results.py``).
``netbench/`` holds the parts of ``bench_multinode.py``, ``scale/`` the studies of ``bench_scale.py``."""
