"""Benchmarks of recbole_llm (quality.py, cost.py, update_readme.py): scripts run from a checkout, not installed."""
