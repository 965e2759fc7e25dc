"""The GPU kit's steps, each run by remote.py in its own process with the kit's wheels on PYTHONPATH:

    python -m benchmarks.gpu.steps check|cf|smoke|cost|quality --plan=gpu --work=DIR --out=DIR --seconds=N

- check (call 1): versions, the imports of every step, the carried wheels in use, the GPU, a LoRA forward+backward
  under bf16 autocast;
- cf (call 1): the CF SASRec that Laser and RSLLM read in cost and quality, trained into the work folder's cache;
- smoke: Laser and RSLLM, one short run each with bf16 autocast, and load_data_and_model's model from the run's
  checkpoint on the same test split: the same metrics;
- cost: benchmarks/cost.py's rows of a profile, in the plan's order while time is left, the page rewritten after each;
- quality: each model trained for a fixed time, its learning curve, the page rewritten after each model.

A step writes <work>/status/<step>.json as it goes (its summary line for remote.py) and its pages into the output
folder. The CUDA-only checks say that they are skipped where there is no GPU (the dry run).
"""

import argparse
import importlib.metadata
import json
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.gpu import REPO
from benchmarks.gpu.remote import load_plan, write_json

VERSIONS = ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "tokenizers", "recbole", "gguf",
            "pandas", "numpy", "scipy", "matplotlib")
RELOAD_TOLERANCE = 1e-4  # RecBole's metrics are rounded to 4 decimals: one unit


class Status:
    """<work>/status/<step>.json, rewritten on every update (what remote.py reads, also after a kill)."""

    def __init__(self, work, step):
        self.path, self.content = Path(work) / "status" / f"{step}.json", {}

    def update(self, **content):
        self.content.update(content)
        write_json(self.path, self.content)


def one_line(error):
    return " ".join(f"{type(error).__name__}: {error}".split())[:300]


def absolute_paths(config):
    """A config whose data_path is relative to the repository (the steps run in the work folder)."""
    path = config.get("data_path")
    if path and not os.path.isabs(path):
        return {**config, "data_path": str(REPO / path)}
    return config


def cf_settings(plan):
    return {"cf_config": plan["cf_config"]} if plan.get("cf_config") else {}


def quality_config(plan, model, work):
    """One quality run's settings: the profile's config and quality settings of the model, the plan's config, the
    plan's CF model, the model's own settings (less its budget), the plan's LLM and the work folder's cache."""
    from benchmarks.settings import load_profile

    profile = load_profile(plan["quality"]["profile"])
    own = {key: value for key, value in plan["quality"]["models"][model].items() if key != "budget_s"}
    return absolute_paths({
        **profile.config, **profile.quality.get(model, {}), **plan["quality"]["config"], **cf_settings(plan), **own,
        "llm_path": plan["llm_path"], "checkpoint_dir": str(Path(work) / "saved"),
    })


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


# ---- check ---------------------------------------------------------------------------------------------------------


def check(plan, work, out, seconds, status):
    import torch

    versions = {dist: version(dist) for dist in VERSIONS}
    print("versions:", json.dumps(versions))
    import benchmarks.cost  # noqa: F401  every step's imports
    import benchmarks.quality  # noqa: F401
    import gguf  # noqa: F401
    import matplotlib  # noqa: F401
    import recbole_llm.quick_start  # noqa: F401
    from benchmarks.gpu.pack import canonical, same_version

    installed = json.loads((Path(work) / "installed.json").read_text())
    for wheel in installed["wheels"]:
        name, carried = Path(wheel).name.split("-")[:2]
        found = version(name)
        if not same_version(found, carried):
            raise RuntimeError(f"{canonical(name)} {found} is imported, not the carried {carried}: check PYTHONPATH")

    cuda = torch.cuda.is_available()
    if plan["cuda"] and not cuda:
        raise RuntimeError("no CUDA device is visible to torch")
    device = torch.device("cuda" if cuda else "cpu")
    parts = [f"torch {versions['torch']}" + (f" (CUDA {torch.version.cuda})" if cuda else ""),
             *(f"{dist} {versions[dist]}" for dist in ("transformers", "peft", "accelerate", "recbole", "pandas"))]
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        parts.insert(0, f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
                        f"sm_{properties.major}{properties.minor}")
    else:
        print("CUDA-only checks skipped (the GPU, bf16 autocast, a bf16 matrix product): no GPU")
        parts.insert(0, "no GPU: CUDA-only checks skipped")
    parts.append(f"LoRA forward+backward{' under bf16 autocast' if cuda else ''} ok (loss {lora_step(device):.3f})")
    if cuda:
        parts.append(f"bf16 8192^3 matrix product {matmul_tflops():.0f} TFLOP/s")
    status.update(summary="; ".join(parts), versions=versions, cuda=cuda)


def lora_step(device):
    """A tiny random Llama with peft's LoRA adapters: one forward and backward, under bf16 autocast on CUDA."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 512, (4, 32), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise RuntimeError("the LoRA step gave a non-finite loss or gradient")
    if not any(g.abs().sum() > 0 for g in grads):
        raise RuntimeError("the LoRA step gave no gradient")
    return float(loss)


def matmul_tflops(size=8192, repeats=10):
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


# ---- cf ------------------------------------------------------------------------------------------------------------


def cf(plan, work, out, seconds, status):
    """The CF model of the quality runs (the cost rows' is the same: the same data settings and cf_config)."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_logger, init_seed

    from recbole_llm.cf_training import trained_checkpoint
    from recbole_llm.checkpoint import load_checkpoint
    from recbole_llm.config import Config

    from benchmarks.settings import load_profile

    dataset = load_profile(plan["quality"]["profile"]).dataset
    config = Config(model="Laser", dataset=dataset, config_dict=quality_config(plan, "Laser", work))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    train_data, _, _ = data_preparation(config, create_dataset(config))
    start = time.perf_counter()
    path = trained_checkpoint(config, train_data._dataset)
    seconds_taken = time.perf_counter() - start
    checkpoint = load_checkpoint(path)
    best = checkpoint.get("best_valid_score")
    status.update(summary=f"{config['cf_model']} on {dataset} in {seconds_taken:.0f} s (cached: {Path(path).name})"
                          + (f", best valid {config['valid_metric']} {best:.4f} after epoch {checkpoint.get('epoch')}"
                             if isinstance(best, float) else ""))


# ---- smoke ---------------------------------------------------------------------------------------------------------


def smoke(plan, work, out, seconds, status):
    import torch

    from benchmarks.cost import llm_parts
    from recbole_llm.quick_start import load_data_and_model, run_recbole_llm
    from recbole_llm.utils import get_trainer

    cuda = torch.cuda.is_available()
    lines, failed = [], False
    for label, settings in plan["smoke"]["models"].items():  # label -> settings, `model` among them or the label
        start = time.perf_counter()
        model_name = settings.get("model", label)
        own = {key: value for key, value in settings.items() if key != "model"}
        config_dict = absolute_paths({**plan["smoke"]["config"], "llm_path": plan["llm_path"], **own,
                                      "checkpoint_dir": str(Path(work) / "saved-smoke")})
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = run_recbole_llm(model_name, plan["smoke"]["dataset"], config_dict=config_dict)
            config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
            trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
            reloaded = trainer.evaluate(test_data, load_best_model=False)
            tested = result["test_result"]
            difference = max(abs(float(tested[key]) - float(reloaded[key])) for key in tested if key in reloaded)
            ok = difference <= RELOAD_TOLERANCE
            line = (f"{label}: test NDCG@10 {tested['ndcg@10']:.4f}, {reloaded['ndcg@10']:.4f} after "
                    f"load_data_and_model (largest metric difference {difference:.4f})")
            if cuda:
                weight = next(llm_parts(model)[0].parameters())
                on_gpu = (config["device"].type == "cuda" and weight.device.type == "cuda"
                          and weight.dtype == torch.bfloat16 and trainer.amp_dtype == torch.bfloat16)
                ok = ok and on_gpu
                line += (f"; LLM {str(weight.dtype).removeprefix('torch.')} on {weight.device}, autocast "
                         f"{str(trainer.amp_dtype).removeprefix('torch.')}, peak "
                         f"{torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")
            else:
                print(f"{label}: CUDA-only checks skipped (the LLM in bf16 on the GPU, bf16 autocast): no GPU")
                line += "; CUDA checks skipped (no GPU)"
        except Exception as error:
            traceback.print_exc()
            ok, line = False, f"{label}: {one_line(error)}"
        failed = failed or not ok
        lines.append(f"{line}, {time.perf_counter() - start:.0f} s{'' if ok else ' -- FAILED'}")
        print(lines[-1], flush=True)
        status.update(summary="; ".join(lines), failed=failed)


# ---- cost ----------------------------------------------------------------------------------------------------------


def cost(plan, work, out, seconds, status):
    from benchmarks import cost as cost_benchmark
    from benchmarks.report import Stamp
    from benchmarks.settings import load_profile

    deadline = time.monotonic() + seconds - 5
    overrides = {**cf_settings(plan), "checkpoint_dir": str(Path(work) / "saved")}
    profile = load_profile(plan["cost"]["profile"], overrides)
    profile.config = absolute_paths(profile.config)
    order = plan["cost"]["rows"]
    unknown = [label for label in order if label not in profile.cost]
    if unknown:
        raise ValueError(f"rows {unknown} are not in profile {profile.name}: {list(profile.cost)}")
    command = (f"python -m benchmarks.gpu run (its cost step: benchmarks.cost's rows of profile {profile.name} with "
               f"{json.dumps({key: value for key, value in overrides.items() if key != 'checkpoint_dir'})})")
    stamp = Stamp(profile, command)
    rows, notes = {}, []
    for label in order:
        left = deadline - time.monotonic()
        if left < plan["cost"]["row_seconds"]:
            notes.append(f"{label}: not measured, {max(left, 0):.0f} s of the step were left")
            continue
        try:
            rows[label] = cost_benchmark.measure_row(profile, label)
        except Exception as error:
            traceback.print_exc()
            notes.append(f"{label}: failed: {one_line(error)}")
        measured = [rows[label] for label in profile.cost if label in rows]
        left_out = [f"{label}: not in the kit's plan" for label in profile.cost if label not in order]
        if measured:
            cost_benchmark.write_results(Path(out), profile, stamp, measured, notes + left_out)
        summary = "; ".join([cost_summary(measured, profile.cost), *notes])
        status.update(summary=summary, failed=any(": failed: " in note for note in notes))
    if not rows:
        status.update(summary="no row measured: " + "; ".join(notes), failed=True)


def cost_summary(rows, labels):
    parts = []
    for row in rows:
        part = f"{row['run']} {row['train samples/s']:,.0f} samples/s"
        if row.get("% of peak") is not None:
            part += f" ({row['% of peak']:.1f}% of bf16 peak)"
        parts.append(part)
    return f"{len(rows)} of {len(labels)} rows: " + "; ".join(parts)


# ---- quality -------------------------------------------------------------------------------------------------------


class TrainingBudget:
    """A fit that trains for at most `seconds` of wall-clock time, split over the model's stages by their epochs: a
    stage ends at its first validation past its share (RecBole's fit asks `early_stopping` whether to stop; it is
    replaced for the fit). Counts the samples the model trains on and keeps the learning curve (callback_fn)."""

    def __init__(self, model_name, trainer, model, seconds, valid_metric):
        from recbole_llm.model.abstract_recommender import LLMSequentialRecommender

        self.model_name, self.trainer, self.model, self.valid_metric = model_name, trainer, model, valid_metric
        if isinstance(model, LLMSequentialRecommender):
            stages = {stage.name: stage.epochs for stage in model.training_stages() if stage.epochs > 0}
        else:
            stages = {"train": trainer.epochs}
        total = sum(stages.values())
        self.shares = {name: seconds * epochs / total for name, epochs in stages.items()}
        self.curve, self.samples, self.why = [], 0, {}
        self.stage, self.start, self.last_point = None, None, None

    def __enter__(self):
        import recbole.trainer.trainer as recbole_trainer

        self.module, self.early_stopping = recbole_trainer, recbole_trainer.early_stopping
        recbole_trainer.early_stopping = self._early_stopping
        calculate_loss = self.model.calculate_loss

        def counted(interaction):
            self.samples += len(interaction)
            return calculate_loss(interaction)

        self.model.calculate_loss = counted  # the trainers call model.calculate_loss: this instance's, counted
        self.start = self.last_point = time.perf_counter()
        return self

    def __exit__(self, *error):
        self.module.early_stopping = self.early_stopping
        del self.model.calculate_loss

    def _early_stopping(self, value, best, cur_step, max_step, bigger=True):
        best, cur_step, stop, update = self.early_stopping(value, best, cur_step, max_step, bigger=bigger)
        stage = getattr(self.trainer, "stage", None)
        name = stage.name if stage is not None else "train"
        if name != self.stage:  # a new stage began where the last one's last validation ended
            self.stage, self.stage_start = name, self.last_point
        if stop:
            self.why[name] = "early stopping"
        elif time.perf_counter() - self.stage_start >= self.shares.get(name, 0):
            stop, self.why[name] = True, "budget"
        return best, cur_step, stop, update

    def callback(self, epoch_idx, valid_score):
        self.last_point = time.perf_counter()
        self.curve.append({
            "model": self.model_name, "stage": self.stage, "epoch": epoch_idx, "samples seen": self.samples,
            "seconds": round(self.last_point - self.start, 2), f"valid {self.valid_metric.lower()}": valid_score,
        })

    def stopped_by(self):
        reasons = [f"{name}: {self.why.get(name, 'epochs')}" for name in self.shares]
        return reasons[0].split(": ")[1] if len(reasons) == 1 else ", ".join(reasons)


def budgeted_run(model_name, dataset_name, config_dict, seconds):
    """run_recbole_llm's straight line, with the fit under a TrainingBudget; its result dict, with the curve."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_llm.config import Config
    from recbole_llm.model.abstract_recommender import count_parameters
    from recbole_llm.quick_start import build_model, evaluate_collaborative_model
    from recbole_llm.run_log import init_run_logger
    from recbole_llm.utils import get_trainer

    config_dict = {**config_dict, "validate_every_stage": True}  # the curve: a point after every epoch of every stage
    config = Config(model=model_name, dataset=dataset_name, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = build_model(config, train_data._dataset)
    trainable, total = count_parameters(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    budget = TrainingBudget(model_name, trainer, model, seconds, config["valid_metric"])
    train_start = time.perf_counter()
    with budget:
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=True, show_progress=False, callback_fn=budget.callback
        )
    eval_start = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=True)
    eval_end = time.perf_counter()
    print(f"{model_name}: {budget.samples:,} samples in {eval_start - train_start:.0f} s ({budget.stopped_by()}), "
          f"test {dict(test_result)}", flush=True)
    return {
        "companions": [evaluate_collaborative_model(config, model, dataset, valid_data, test_data)]
        if hasattr(model, "cf_encoder") else [],
        "model": model_name, "best_valid_score": best_valid_score, "valid_metric": config["valid_metric"],
        "test_result": test_result, "trainable_parameters": trainable, "train_time": eval_start - train_start,
        "eval_time": eval_end - eval_start, "budget_s": seconds, "samples_seen": budget.samples,
        "stopped_by": budget.stopped_by(), "curve": budget.curve,
    }


def quality(plan, work, out, seconds, status):
    from benchmarks.report import Stamp
    from benchmarks.settings import Profile, load_profile

    start = time.monotonic()
    deadline = start + seconds - 5
    settings = plan["quality"]
    base = load_profile(settings["profile"])
    models, overhead = settings["models"], settings["overhead_s"]
    budgets = sum(model["budget_s"] for model in models.values())
    scale = min(1.0, max(0.0, (seconds - 5 - overhead * len(models)) / budgets)) if budgets else 1.0
    if scale < 1:
        print(f"the budgets shrink to {scale:.0%}: {seconds:.0f} s for the step")
    page_profile = Profile(name=settings["name"], text=plan["text"], dataset=base.dataset,
                           config={**base.config, **settings["config"]}, quality=models, cost={}, cost_steps={})
    stamp = Stamp(page_profile, f"python -m benchmarks.gpu run (its quality step: plans/{plan['name']}.yaml)")
    results, notes = [], []
    for model_name, model_settings in models.items():
        left = deadline - time.monotonic() - overhead
        budget = min(model_settings["budget_s"] * scale, max(left, 0))
        if left <= 0:
            notes.append(f"{model_name}: not run, the step's time was spent")
            continue
        try:
            results.append(budgeted_run(model_name, base.dataset, quality_config(plan, model_name, work), budget))
        except Exception as error:
            traceback.print_exc()
            notes.append(f"{model_name}: failed: {one_line(error)}")
        if results:
            write_quality(Path(out), settings["name"], base.dataset, stamp, results, notes)
        status.update(summary=quality_summary(results, notes), failed=any(": failed: " in note for note in notes))


def quality_rows(results):
    from recbole_llm.comparison import comparison_rows, with_companions

    rows = comparison_rows(with_companions(results))
    for row, result in zip(rows, with_companions(results)):
        row.update({key: float(row[key]) for key in ("train time (s)", "eval time (s)") if row[key] is not None})
        row["budget (s)"] = round(result["budget_s"], 1) if result.get("budget_s") is not None else None
        row["samples seen"] = result.get("samples_seen")
        row["stopped by"] = result.get("stopped_by")
    return rows


def write_quality(out, name, dataset, stamp, results, notes):
    """quality-<name>.md, .csv, .png (test metrics, learning curves) and curves-<name>.csv."""
    from benchmarks.quality import COLUMNS, PLOTTED, gpu_name
    from benchmarks.report import saved_figure, write_page
    from recbole_llm.comparison import markdown_table, write_csv

    rows = quality_rows(results)
    curves = [point for result in results for point in result["curve"]]
    out.mkdir(parents=True, exist_ok=True)
    stem = str(out / f"quality-{name}")
    write_csv(stem, rows)
    write_csv(str(out / f"curves-{name}"), curves)
    with saved_figure(stem, len(PLOTTED) + 1) as axes:
        for axis, (key, label) in zip(axes, PLOTTED.items()):
            axis.barh([row["model"] for row in rows][::-1], [row[key] for row in rows][::-1], color="tab:blue")
            axis.set_xlabel(label)
        plot_curves(axes[-1], results)
    columns = {**COLUMNS, "budget (s)": "budget (s)", "samples seen": "samples seen", "stopped by": "stopped by"}
    metric = f"valid {results[0]['valid_metric']}"  # e.g. valid NDCG@10; the curves' key is in lower case
    curve_columns = {"model": "model", "stage": "stage", "epoch": "epoch", "samples seen": "samples seen",
                     "seconds": "seconds", metric.lower(): metric}
    sections = [
        ("Test split (each model's best validation checkpoint)", markdown_table(rows, columns)),
        (f"Learning curves: {metric} after each epoch, against the training samples seen",
         markdown_table(curves, curve_columns)),
        *([("Not run", "\n".join(f"- {note}" for note in notes))] if notes else []),
    ]
    title = f"Quality, short: {dataset}, full ranking over all items, each model for a fixed time, profile {name}"
    write_page(stem, title, stamp, sections, gpu_name=gpu_name())
    print(f"written: {stem}.md, .csv, .png and curves-{name}.csv", flush=True)


def plot_curves(axis, results):
    for result in results:
        points = [point for point in result["curve"] if point["samples seen"] > 0]
        if len(points) > 1 or result["companions"]:  # the LLM models, and any baseline with a curve
            metric = f"valid {result['valid_metric'].lower()}"
            axis.plot([p["samples seen"] for p in points], [p[metric] for p in points], marker="o",
                      label=result["model"])
    axis.set_xscale("log")
    axis.set_xlabel("training samples seen (log scale)")
    axis.set_ylabel(f"valid {results[0]['valid_metric']}")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def quality_summary(results, notes):
    parts = [f"{result['model']} {result['test_result']['ndcg@10']:.4f} ({result['samples_seen']:,} samples, "
             f"{result['train_time']:.0f} s, {result['stopped_by']})" for result in results]
    return "test NDCG@10: " + "; ".join(parts + notes)


# ---- the command line ----------------------------------------------------------------------------------------------

STEPS = {"check": check, "cf": cf, "smoke": smoke, "cost": cost, "quality": quality}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.steps")
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--plan", default="gpu")
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args(argv)
    status = Status(args.work, args.step)
    status.update(summary="started", failed=False)
    try:
        STEPS[args.step](load_plan(args.plan), Path(args.work), Path(args.out), args.seconds, status)
    except Exception as error:
        traceback.print_exc()
        status.update(summary=f"{status.content.get('summary', '')} -- {one_line(error)}".removeprefix("started -- "),
                      failed=True)
        return 1
    return 1 if status.content.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
