"""Evaluation tasks, run as `python -m eval.<task>` from the repository root."""
