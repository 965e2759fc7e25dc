"""One straight line from config to test metrics, as RecBole's quick_start, plus several models in one table, in
one process or, as RecBole's ``run``, in several.

RecBole's own ``recbole.quick_start`` imports ray at import time (broken on NumPy 2 / setuptools >= 82), so it is
never imported here.
"""

import logging
import os
import sys
from logging import getLogger
from time import time

import torch.distributed as dist
import torch.multiprocessing as mp
from recbole.data import create_dataset
from recbole.utils import get_local_time, init_seed, set_color

from recbole_llm.candidate_evaluation import sequential_test_data
from recbole_llm.cf_training import caching_cf_models, cf_training_configs, trained_checkpoint
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.cold_items import cold_test_result, data_preparation
from recbole_llm.comparison import SIGNIFICANCE_SETTINGS, with_companions, write_comparison
from recbole_llm.config import Config, cpu_budget, restore_numpy_aliases, single_process
from recbole_llm.distributed import writes_files
from recbole_llm.environment import run_environment
from recbole_llm.errors import RecBoleLLMError, is_int, is_number, require
from recbole_llm.memory import fix_mmap_threshold
from recbole_llm.model.abstract_recommender import LLMSequentialRecommender, count_parameters
from recbole_llm.resume import read_resume_checkpoint, resume_file
from recbole_llm.run_log import init_run_logger
from recbole_llm.trainer import load_model_state
from recbole_llm.utils import get_model, get_trainer


def build_model(config, dataset):
    """The model of config['model'] on the training dataset, on its device. An LLM model's settings are checked
    first, then its CF model is trained (and cached) when none is given: the model itself only loads it."""
    model_class = get_model(config["model"])
    if issubclass(model_class, LLMSequentialRecommender):
        model_class.check_settings(config, dataset)  # before anything costly: the CF model, the LLM
        if model_class.reads_cf_model(config) and not config["cf_checkpoint"]:
            config["cf_checkpoint"] = trained_checkpoint(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return model_class(config, dataset).to(config["device"])


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, callback_fn=None,
                    cf_configs=()):
    """Train, validate and test one model; returns RecBole's result dict plus sizes and timings. callback_fn(epoch,
    valid_score) is called after every validation (RecBole's Trainer.fit argument). cf_configs: the CF models that
    later models of a comparison read, cached from this run where it trains as one would (caching_cf_models)."""
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    resume = resume_file(config)
    if resume:
        read_resume_checkpoint(resume, config)  # a wrong file fails now, before the LLM or the CF model is built
    init_seed(config["seed"], config["reproducibility"])
    threshold = config["mmap_threshold_mb"]
    require(config, "mmap_threshold_mb", threshold is None or is_number(threshold) and threshold > 0,
            "use a size in MB (e.g. 1), or None for the C library's default")
    fix_mmap_threshold(threshold)  # before the tensors a run allocates
    cap = config["train_batches_per_epoch"]
    require(config, "train_batches_per_epoch", cap is None or is_int(cap) and cap > 0,
            "use a positive number of batches, or None for every training prefix")
    require(config, "candidate_seed", config["candidate_seed"] is None or is_int(config["candidate_seed"]),
            "use an integer: it draws the candidate protocol's users and candidates")
    if writes_files(config):  # the other processes of a multi-process run only report errors, on stderr
        init_run_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(set_color("environment", "blue") + f": {run_environment()} (its sums decide the last digits)")
    budget = cpu_budget(config)
    if budget:
        logger.info(set_color("the default LLM on a CPU", "blue") + f": {budget} (cpu_budget, unless you set them)")
    logger.info(config)

    dataset = create_dataset(config)
    logger.info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)

    model = build_model(config, train_data._dataset)
    logger.info(model)
    trainable, total = count_parameters(model)
    logger.info(set_color("trainable parameters", "blue") + f": {trainable:,} of {total:,}")

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if resume:
        trainer.resume_checkpoint(resume)
    if cf_configs and saved and writes_files(config):  # one process writes the cache
        callback_fn = caching_cf_models(config, trainer, train_data._dataset, cf_configs, callback_fn)
    train_start = time()
    try:
        best_valid_score, best_valid_result = trainer.fit(
            train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback_fn
        )
    except KeyboardInterrupt:
        if trainer.last_checkpoint_file and os.path.isfile(trainer.last_checkpoint_file):
            logger.warning(f"interrupted: --resume={trainer.last_checkpoint_file} continues this run")
        raise
    eval_start = time()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_per_user = user_tokens(trainer.last_per_user, dataset, config)
    if config["candidate_eval"] and not trainer.reads_histories():  # Pop: the sequential models' users and candidates
        test_result.update(trainer.candidate_result(sequential_test_data(config)))
    candidate_per_user = user_tokens(trainer.last_candidate_per_user, dataset, config)
    eval_end = time()
    cold_result = cold_test_result(config, trainer, test_data)
    trainable, total = count_parameters(model)  # of the tested weights' stage (a stage sets what trains)

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    if cold_result:
        logger.info(set_color("test result on cold items", "yellow") + f": {cold_result}")
    return {
        "companions": [evaluate_collaborative_model(config, model, dataset, valid_data, test_data)]
        if hasattr(model, "cf_encoder") else [],
        "model": config["model"],
        "seed": config["seed"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "valid_metric": config["valid_metric"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "test_per_user": test_per_user,
        "candidate_per_user": candidate_per_user,
        "cold_test_result": cold_result,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "tested_stage": model.stage if isinstance(model, LLMSequentialRecommender) else None,
        "autocast": "bf16" if getattr(trainer, "amp_dtype", None) else None,  # what the LLM's passes computed in
        "train_time": eval_start - train_start,
        "eval_time": eval_end - eval_start,
        "saved_model_file": trainer.saved_model_file if saved else None,
        "checkpoint_dir": config["checkpoint_dir"],
        "comparison_settings": {key: config[key] for key in SIGNIFICANCE_SETTINGS},
    }


def user_tokens(per_user, dataset, config):
    """Per-user metrics with the dataset's user ids (as its files write them) instead of RecBole's internal ones."""
    if per_user is None:
        return None
    return {**per_user, "user_id": dataset.id2token(config["USER_ID_FIELD"], per_user["user_id"])}


def evaluate_collaborative_model(config, model, dataset, valid_data, test_data):
    """The frozen CF model an LLM model is built on, scored on the same validation and test users: the number to
    beat."""
    recommender = model.cf_encoder.recommender
    trainer = get_trainer(config["MODEL_TYPE"], config["cf_model"])(config, recommender)
    valid_score = trainer._valid_epoch(valid_data)[0]  # a validation: RecBole's metrics, no candidate protocol
    start = time()
    test_result = trainer.evaluate(test_data, load_best_model=False)
    eval_time = time() - start
    test_per_user = user_tokens(trainer.last_per_user, dataset, config)
    candidate_per_user = user_tokens(trainer.last_candidate_per_user, dataset, config)
    getLogger().info(set_color(f"test result of its {config['cf_model']}", "yellow") + f": {test_result}")
    return {
        "model": f"{config['cf_model']} (CF model of {config['model']})",
        "seed": config["seed"],
        "best_valid_score": valid_score,
        "valid_metric": config["valid_metric"],
        "test_result": test_result,
        "test_per_user": test_per_user,
        "candidate_per_user": candidate_per_user,
        "cold_test_result": cold_test_result(config, trainer, test_data),
        "trainable_parameters": count_parameters(recommender)[1],  # frozen here, trained before
        "train_time": None,
        "eval_time": eval_time,
    }


def run_recbole_llms(models, dataset, config_file_list=None, config_dict=None, saved=True, model_config_dicts=None,
                     seeds=None, references=None):
    """Run models on the same dataset and split, once per seed of ``seeds`` (None: the config's seed); print and write
    one comparison table, with the CF model each LLM model is built on beside it, and every row's paired difference
    to the ``references`` (model names of ``models``; None: the first model). ``model_config_dicts`` ({model: dict})
    adds settings of single models on top of ``config_dict``."""
    references = check_references(models, references)
    results = []
    for seed in seeds or [None]:
        for name, run_config_dict, cf_configs in comparison_runs(models, dataset, config_file_list, config_dict,
                                                                  model_config_dicts, seed):
            results.append(run_recbole_llm(name, dataset, config_file_list, run_config_dict, saved,
                                           cf_configs=cf_configs))
    if (config_dict or {}).get("local_rank", 0) != 0:
        return results  # local rank 0 writes the table
    # RecBole's loggers add a handler per run; the table goes to stdout once, after all runs.
    table_path = os.path.join(results[0]["checkpoint_dir"], f"comparison-{dataset}-{get_local_time()}")
    footer = [f"Seeds: {', '.join(str(seed) for seed in dict.fromkeys(r['seed'] for r in results))}; "
              f"{run_environment()}."]
    markdown = write_comparison(with_companions(results), table_path, references,
                                results[0]["comparison_settings"], footer)
    print(markdown)
    print(f"comparison written to {table_path}.md, {table_path}.csv and {table_path}-users.csv (every test user)")
    return results


def comparison_runs(models, dataset, config_file_list, config_dict, model_config_dicts, seed):
    """The runs of one seed of a comparison (None: the config's), in order: [(model, its config dict, the CF model
    configs its run caches where it trains as one: those of the LLM models that read it)]."""
    run_config_dicts = {}
    for name in models:
        run_config_dicts[name] = {**(config_dict or {}), **(model_config_dicts or {}).get(name, {})}
        if seed is not None:
            run_config_dicts[name]["seed"] = seed
    # a CF model an LLM model reads, cached from its own row when that row comes first and trains as it would
    cf_configs = cf_training_configs(Config(model=name, dataset=dataset, config_file_list=config_file_list,
                                            config_dict=run_config_dicts[name]) for name in models)
    return [(name, run_config_dicts[name], cf_configs.get(name, ())) for name in models]


def check_references(models, references):
    """The reference models of a comparison (default: its first model), refused before any training unless each is
    one of the compared models."""
    references = list(references or models[:1])
    unknown = [reference for reference in references if reference not in models]
    if unknown:
        raise RecBoleLLMError(f"reference {', '.join(unknown)} is not among the compared models ({', '.join(models)}): "
                              f"--reference names models of --model, e.g. --reference={models[0]}")
    return references


def run(models, dataset, config_file_list=None, config_dict=None, saved=True, nproc=1, world_size=-1, ip="localhost",
        port="5678", group_offset=0, seeds=None, references=None):
    """run_recbole_llms in this process, or, with nproc > 1 or world_size > 0, in nproc processes (RecBole's ``run``):
    one process per GPU of gpu_id (or on the CPU), ranks group_offset.. of a world_size-process group that meets at
    ip:port; a run over several machines calls this once on each. Returns the results of local rank 0."""
    if nproc == 1 and world_size <= 0:
        return run_recbole_llms(models, dataset, config_file_list, config_dict, saved, seeds=seeds,
                                references=references)
    check_references(models, references)  # before the processes start
    group = {"nproc": nproc, "world_size": world_size if world_size > 0 else nproc, "ip": ip, "port": port,
             "offset": group_offset}
    queue = mp.get_context("spawn").SimpleQueue()
    args = (models, dataset, config_file_list, {**(config_dict or {}), **group}, saved, queue, seeds, references)
    spawn_logger = logging.getLogger("torch.multiprocessing.spawn")
    spawn_level = spawn_logger.level
    spawn_logger.setLevel(logging.ERROR)  # torch's note that it stops the other processes when one fails
    reports = []  # read while the processes run: a result larger than the pipe's buffer blocks its writer until then
    try:
        processes = mp.spawn(_run_process, args=args, nprocs=nproc, join=False)
        while not processes.join(timeout=1):
            reports += drained(queue)
    except mp.ProcessRaisedException:
        errors = [report for report in reports + drained(queue) if isinstance(report, RecBoleLLMError)]
        if errors:  # bad input: the process's one-line message, not its traceback
            raise errors[0] from None
        raise
    finally:
        spawn_logger.setLevel(spawn_level)
    return (reports + drained(queue))[0]


def drained(queue):
    """Everything the queue holds now."""
    reports = []
    while not queue.empty():
        reports.append(queue.get())
    return reports


def _run_process(local_rank, models, dataset, config_file_list, config_dict, saved, queue, seeds, references):
    """One process of a multi-process run (torch.multiprocessing.spawn gives it its local rank)."""
    try:
        results = run_recbole_llms(models, dataset, config_file_list, {**config_dict, "local_rank": local_rank}, saved,
                                   seeds=seeds, references=references)
    except RecBoleLLMError as error:
        queue.put(error)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if local_rank == 0:
        queue.put(results)


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """RecBole's hyper-parameter tuning objective, without ray: returns the result dict for one configuration."""
    logger = getLogger()
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
    logging.basicConfig(level=logging.ERROR)
    result = run_recbole_llm(config_dict=config_dict, config_file_list=config_file_list, saved=saved)
    return {key: result[key] for key in ("model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result")}


def load_data_and_model(model_file, trust_checkpoint=False):
    """Rebuild the config, dataset, dataloaders and trained model from a checkpoint written by a run; a checkpoint
    that is not plain data (one of RecBole's own trainer) only with trust_checkpoint."""
    restore_numpy_aliases()  # RecBole's metrics and data code need them, and no Config was built in this process yet
    checkpoint = load_checkpoint(model_file, trust_checkpoint=trust_checkpoint)
    config = single_process(checkpoint["config"])
    config["trust_checkpoint"] = trust_checkpoint  # the caller's consent, not the file's, covers its cf_checkpoint
    init_seed(config["seed"], config["reproducibility"])
    init_run_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = build_model(config, train_data._dataset)
    load_model_state(model, checkpoint)
    return config, model, dataset, train_data, valid_data, test_data
