"""Time one LLM load, one forward+backward into a leaf inputs_embeds (LLM frozen) and one forward, on ml-100k prompts.

    python benchmarks/llm_step_time.py [--llm_path smollm2-135m] [--batch_size 16] [--seq_len 128]
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, without installing the plugin
from recbole_llm.llm import load_llm  # noqa: E402


def movie_titles() -> list[str]:
    """'Title (year)' for every ml-100k item, read from the copy the recbole wheel ships."""
    recbole_dir = Path(next(iter(importlib.util.find_spec("recbole").submodule_search_locations)))
    item_file = recbole_dir / "dataset_example" / "ml-100k" / "ml-100k.item"
    rows = [line.split("\t") for line in item_file.read_text(encoding="utf-8").splitlines()[1:]]
    return [f"{title} ({year})" for _, title, year, _ in rows]


def history_prompts(titles: list[str], batch_size: int, titles_per_user: int = 30) -> list[str]:
    return [
        "This user has watched " + ", ".join(titles[user * titles_per_user : (user + 1) * titles_per_user])
        for user in range(batch_size)
    ]


def mean_seconds(step, runs: int) -> str:
    """Wall and process CPU seconds per call; CPU time shows whether other processes slowed the wall time."""
    step()  # warm-up
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(runs):
        step()
    wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
    return f"{wall / runs:.2f} s ({cpu / runs:.2f} s CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm_path", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    backbone = load_llm(args.llm_path, args.device, args.dtype, args.gradient_checkpointing)
    load_seconds = time.perf_counter() - start

    batch = backbone.tokenizer(
        history_prompts(movie_titles(), args.batch_size),
        max_length=args.seq_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    ).to(backbone.device)
    token_embeds = backbone.input_embeddings()(batch.input_ids).detach()  # [B, T, d_llm]
    decoder = backbone.transformer()

    def forward(inputs_embeds: torch.Tensor) -> torch.Tensor:
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=batch.attention_mask, use_cache=False)
        return hidden.last_hidden_state[:, -1]  # [B, d_llm], the state a user embedding is read from

    def forward_backward() -> None:
        inputs_embeds = token_embeds.clone().requires_grad_(True)
        forward(inputs_embeds).float().pow(2).mean().backward()
        assert inputs_embeds.grad is not None

    def forward_only() -> None:
        with torch.no_grad():
            forward(token_embeds)

    train_time = mean_seconds(forward_backward, args.runs)
    eval_time = mean_seconds(forward_only, args.runs)
    batch_shape = f"{args.batch_size} x {batch.input_ids.shape[1]} tokens"
    print(f"llm_path {args.llm_path} on {backbone.device}, {backbone.dtype}, {torch.get_num_threads()} threads")
    print(f"load:             {load_seconds:.1f} s")
    print(f"forward+backward: {train_time} per batch of {batch_shape}, mean of {args.runs} after 1 warm-up")
    print(f"forward only:     {eval_time} per batch of {batch_shape}, mean of {args.runs} after 1 warm-up")


if __name__ == "__main__":
    main()
