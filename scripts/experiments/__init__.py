"""One-off studies behind a design decision (global-batch LBL, smoothed placement objectives,
DeepSpeed's MoE parameter groups); each documents its question and result in its docstring."""
