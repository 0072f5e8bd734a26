"""Orchestration: config, the Ray Data plan, run bookkeeping, CLI, reports."""
