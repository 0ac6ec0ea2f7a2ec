"""Traces: what happened (or would happen) in one run, whoever produced it."""

from tiertune.traces.trace import EVENT_COLUMNS, MEMORY_COLUMNS, Trace

__all__ = ["Trace", "EVENT_COLUMNS", "MEMORY_COLUMNS"]
