"""Frozen LLM backbones, the text of every item, and prompts assembled from cached token ids."""

from recbole_llm.llm.backbone import LLMBackbone, load_llm
