"""Benchmark evaluation: `deepseek-vl2 eval`, the standard metrics, and wrappers for lmms-eval and VLMEvalKit."""
