"""Utilities: ``render_results`` (docs pages from ``results/``), ``netcluster`` (Ray nodes in network
namespaces), ``gpu_check`` (run by scripts/gpu_check.sh), ``activation_memory`` (activation bytes per
mode), ``probe_bad_input`` and ``probes/`` (outside probes of the CLI)."""
