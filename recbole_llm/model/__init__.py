"""Model components shared by the LLM-based recommenders."""
