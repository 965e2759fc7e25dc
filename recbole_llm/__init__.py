"""recbole_llm: LLM-based sequential recommenders (Laser, RSLLM) as RecBole models."""

__version__ = "0.1.0"

from recbole_llm.config import Config
from recbole_llm.quick_start import load_data_and_model, objective_function, run_recbole_llm, run_recbole_llms

__all__ = ["Config", "run_recbole_llm", "run_recbole_llms", "objective_function", "load_data_and_model"]
