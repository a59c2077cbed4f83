"""MoE layer parts, one role per file: router, dispatcher, experts, layer."""
