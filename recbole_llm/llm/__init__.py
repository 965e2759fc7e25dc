from recbole_llm.llm.backbone import LLMBackbone, load_llm
