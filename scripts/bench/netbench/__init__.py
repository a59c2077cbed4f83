"""Parts of scripts/bench/bench_multinode.py: the arm driver run inside a namespace node (``arm``), the
DeepSpeed-MoE peer (``ds_peer``), the placements compared (``plan``), the report (``report``) and the
rebuild of a stopped run's report (``salvage``)."""
