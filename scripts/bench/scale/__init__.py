"""Studies of scripts/bench/bench_scale.py: memory-planner validation (``memory``), bf16 / ZeRO /
checkpointing measurements (``features``) and the spawned gloo ranks they run on (``procs``)."""
