"""Simulator: cost model, task-graph builder and discrete-event engine.

Imports nothing from planner/ or executor/ (one-direction data flow, DESIGN.md).
"""
