"""Continuous-batching generation engine: sequence, scheduler, slot cache, model runner and the loop."""

from deepseek_vl.engine.engine import Engine, EngineClosed, EngineStream, Handle

__all__ = ["Engine", "EngineClosed", "EngineStream", "Handle"]
