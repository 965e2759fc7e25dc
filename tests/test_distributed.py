"""Multi-process runs as RecBole drives them: two CPU processes (gloo) on the tiny data give, for the checkpoints they
write, the metrics one process computes; only local rank 0 writes; a bad setting fails in one line."""

import socket
import sys

import pytest
import torch
import torch.distributed as dist

import run_recbole_llm
from conftest import LASER_SIZES, RSLLM_SIZES, TINY_DATASET, module_workdir, tiny_config
from recbole_llm import quick_start
from recbole_llm.config import Config
from recbole_llm.distributed import gather_in_sample_order
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.quick_start import load_data_and_model, run
from recbole_llm.utils import get_trainer

MODELS = ["SASRec", "Laser", "RSLLM"]
SIZES = {
    **LASER_SIZES,
    **RSLLM_SIZES,
    "candidate_eval": True,
    "train_batch_size": 64,  # SASRec's RecBole trainer runs every batch of its epoch
    "grad_accum_steps": 2,  # the LLM models' first batch adds to the gradient without syncing it
    "user_inter_num_interval": "[23,inf)",  # 271 users: DistributedSampler gives one of them to both processes
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return str(probe.getsockname()[1])


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One comparison of SASRec, Laser and RSLLM trained and tested by 2 CPU processes, in its own directory."""
    with module_workdir(tmp_path_factory, "distributed") as path, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread, as this process evaluates: the same float sums
        results = run(MODELS, TINY_DATASET, config_dict=tiny_config(path, **SIZES), nproc=2, port=free_port())
        yield path, {result["model"]: result for result in results}


@pytest.mark.parametrize("model_name", MODELS)
def test_two_processes_give_the_metrics_of_one_process_on_the_same_checkpoint(two_processes, model_name):
    result = two_processes[1][model_name]
    config, model, _, _, valid_data, test_data = load_data_and_model(result["saved_model_file"])
    assert config["single_spec"] and len(test_data.dataset) == 271
    trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)

    test_result = trainer.evaluate(test_data, load_best_model=False)
    assert test_result == pytest.approx(result["test_result"], abs=1e-6)
    # each test user once, with the metrics one process gives that user
    per_user = result["test_per_user"]
    assert len(set(per_user["user_id"])) == len(per_user["user_id"]) == 271
    assert per_user["ndcg@10"] == pytest.approx(trainer.last_per_user["ndcg@10"], abs=1e-6)
    assert set(test_result) >= {"ndcg@10", *(["hr@1_candidates", "valid_ratio"] if model_name == "RSLLM" else [])}
    # The saved weights are rank 0's, the validation result both processes' weights: equal when gradients were synced.
    valid_result = trainer.evaluate(valid_data, load_best_model=False)
    assert {key: valid_result[key] for key in result["best_valid_result"]} == pytest.approx(
        result["best_valid_result"], abs=1e-6
    )
    assert result["test_result"]["hit@20"] > 0  # a comparison of something


def test_only_local_rank_zero_writes_logs_checkpoints_and_the_table(two_processes):
    path, results = two_processes
    for model_name in MODELS:
        assert len(list((path / "log" / model_name).glob("*.log"))) == 1
        checkpoints = [str(checkpoint) for checkpoint in (path / "saved").glob(f"{model_name}-*.pth")]
        best = results[model_name]["saved_model_file"]
        assert sorted(checkpoints) == sorted([best, best.removesuffix(".pth") + "-last.pth"])  # best, resume point
    assert len(list((path / "saved").glob("cf-SASRec-*.pth"))) == 1  # trained once, by rank 0, read by both
    assert len(list((path / "saved").glob("comparison-*.md"))) == 1
    assert not list((path / "saved").glob("*.partial"))
    companions = [companion["model"] for result in results.values() for companion in result["companions"]]
    assert companions == ["SASRec (CF model of Laser)", "SASRec (CF model of RSLLM)"]


@pytest.fixture
def one_process_group(tmp_path):
    """A multi-process Config of a group of one process: it starts the process group."""
    group = {"local_rank": 0, "nproc": 1, "world_size": 1, "ip": "localhost", "port": free_port(), "offset": 0}
    config = Config(model="SASRec", dataset=TINY_DATASET, config_dict=tiny_config(tmp_path, **group))
    yield config
    dist.destroy_process_group()


def test_a_process_on_the_cpu_joins_a_gloo_group(one_process_group):
    assert dist.get_backend() == "gloo" and dist.get_world_size() == 1
    assert one_process_group["device"] == torch.device("cpu") and not one_process_group["single_spec"]


def test_gathered_rows_hold_each_sample_once_in_sample_order(one_process_group):
    samples = torch.tensor([4, 0, 2, 1, 3, 0])  # 0 twice, as DistributedSampler repeats samples to even out processes
    scores, names = gather_in_sample_order(samples, [samples[:, None] * 10.0, [f"user {s}" for s in samples.tolist()]])
    assert scores.squeeze(1).tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert names == ["user 0", "user 1", "user 2", "user 3", "user 4"]


def test_a_bad_setting_fails_in_every_process_and_the_run_says_it_in_one_line(tmp_path):
    """llm_device_map shards one LLM in one process: every process refuses it before any work."""
    config_dict = tiny_config(tmp_path, **LASER_SIZES, llm_device_map="auto")
    with pytest.raises(RecBoleLLMError, match="use llm_device_map with nproc=1"):
        run(["Laser"], TINY_DATASET, config_dict=config_dict, nproc=2, port=free_port())


def test_cli_passes_recboles_multi_process_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(quick_start, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(sys, "argv", [
        "run_recbole_llm.py", "--model=SASRec,Laser", "--nproc=2", "--world_size=4", "--ip=10.0.0.1", "--port=29500",
        "--group_offset=2",
    ])
    run_recbole_llm.main()
    group = dict(nproc=2, world_size=4, ip="10.0.0.1", port="29500", group_offset=2, seeds=None, references=None)
    assert calls == [((["SASRec", "Laser"], "ml-100k", None), group)]
