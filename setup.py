"""recbole_llm: LLM-based sequential recommenders (Laser, RSLLM) as RecBole models."""

from setuptools import find_packages, setup

setup(
    name="recbole_llm",
    version="0.1.0",
    description="LLM-based sequential recommenders (Laser, RSLLM) as RecBole models",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["recbole_llm", "recbole_llm.*"]) + ["recbole_llm.properties"],
    # properties/ sits at the repository top (RecBole plugin layout) and ships inside the package when installed
    package_dir={"recbole_llm.properties": "properties"},
    package_data={"recbole_llm.properties": ["*.yaml", "model/*.yaml", "dataset/*.yaml"]},
    install_requires=[
        "recbole==1.2.1",
        "torch>=2.6",
        "transformers>=5.0",  # GGUF dequantization and activation checkpointing APIs of v5
        "peft>=0.13",
        "gguf>=0.10",
        "pyyaml",
        "scipy",
        "pandas<3",  # pandas 3 breaks RecBole's token_seq fields (movie_title)
    ],
    # bench: the benchmarks' figures (benchmarks/); the tests run the benchmarks, figures included
    extras_require={"bench": ["matplotlib>=3.8"], "test": ["pytest", "matplotlib>=3.8"]},
)
