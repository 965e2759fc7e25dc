"""The benchmark scripts on the smoke profile (the tiny data, a tiny LLM): each writes its page, table and figure
with sane numbers, and update_readme.py puts the pages into a README's Results section."""

import contextlib
import csv
import os
import re
import shutil
from datetime import datetime, timezone

import pytest
import torch

from benchmarks import ablations, cold, cost, curves, kept_runs, limits, quality, rsllm_picks, scale
from benchmarks.settings import PROFILES_DIR, labelled_runs, load_profile
from benchmarks.update_readme import BEGIN, END, results_section, update_readme
from conftest import RSLLM_SIZES, TESTS_DIR, TINY_DATASET, module_workdir, tiny_config
import recbole_llm.environment
from recbole_llm.config import Config
from recbole_llm.errors import RecBoleLLMError
from recbole_llm.llm import load_llm

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The scripts run once, on the smoke profile, into one results folder (the CF model trained once, reused)."""
    with module_workdir(tmp_path_factory, "benchmarks") as workdir:
        arguments = ["--profile=smoke", f"--out={workdir / 'results'}", f"--data_path={TESTS_DIR}/data"]
        quality.main(arguments)
        cost.main(arguments)
        curves.main(arguments)
        cold.main(arguments)
        with pytest.MonkeyPatch.context() as patch:  # the bf16 copy's and the autocast rows too, on any CPU
            patch.setattr(recbole_llm.environment, "cpu_computes_bf16", lambda: True)
            limits.main([*arguments, "--cpu_bf16=True"])
        scale.main(arguments)
        ablations.main([*arguments, f"--checkpoint_dir={workdir / 'saved'}"])
        yield workdir / "results"


@pytest.fixture(scope="module")
def ablation_arguments(out):
    return ["--profile=smoke", f"--out={out}", f"--data_path={TESTS_DIR}/data",
            f"--checkpoint_dir={out.parent / 'saved'}"]


def read_rows(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def number(text):
    return float(text.replace(",", ""))


def assert_page(out, stem, expected_rows, figure=True):
    page = out.joinpath(f"{stem}.md").read_text()
    stamp = ["**Machine**", "**Versions**: Python 3.", "torch 2.", "recbole 1.2.1", "**Seed** 2020", "load average"]
    assert all(line in page for line in stamp)
    assert "llm_path: tiny-llama" in page  # the profile
    if figure:
        assert out.joinpath(f"{stem}.png").read_bytes().startswith(PNG_SIGNATURE)
        assert f"![" in page and f"]({stem}.png)" in page
    for label in expected_rows:
        assert f"| {label} |" in page


def test_quality_has_a_row_per_model_and_per_cf_model_with_sane_metrics(out):
    rows = read_rows(out / "quality-smoke.csv")
    expected = ["SASRec", "Laser", "SASRec (CF model of Laser)", "RSLLM", "SASRec (CF model of RSLLM)"]
    assert [row["model"] for row in rows] == expected
    assert list(load_profile("smoke").quality) == ["SASRec", "Laser", "RSLLM"]
    for row in rows:
        recall, ndcg = number(row["test recall@10"]), number(row["test ndcg@10"])
        assert 0 <= ndcg <= recall <= number(row["test recall@20"]) <= 1  # one target per user: NDCG <= hit
        assert number(row["trainable params"]) > 0
    rsllm = rows[3]
    assert 0 <= number(rsllm["test hr@1_x_valid_ratio"]) <= number(rsllm["test valid_ratio"]) <= 1
    assert number(rows[4]["test valid_ratio"]) == 1  # RSLLM's CF SASRec on the same candidates, by its scores
    assert rows[0]["test hr@1_candidates"] == ""  # the SASRec row ran without candidate_eval
    assert_page(out, "quality-smoke", expected)


def test_quality_goes_on_from_the_runs_it_kept_and_waits_for_a_claimed_one(out, tmp_path, monkeypatch):
    [runs] = (out.parent / "saved").glob("quality-smoke-*-runs")
    shutil.copytree(runs, tmp_path / "saved" / runs.name)
    monkeypatch.chdir(tmp_path)  # the runs kept as the fixture's call left them
    monkeypatch.setattr(quality, "run_recbole_llm", lambda *args, **kwargs: pytest.fail("a kept run was made again"))
    arguments = ["--profile=smoke", f"--out={tmp_path / 'results'}", f"--data_path={TESTS_DIR}/data"]
    rows = quality.main(arguments)
    assert [(row["model"], row["test ndcg@10"]) for row in rows] == \
        [(row["model"], number(row["test ndcg@10"])) for row in read_rows(out / "quality-smoke.csv")]
    kept = tmp_path / "saved" / runs.name / "RSLLM-2020.pickle"
    kept.unlink()
    kept.with_suffix(".running").write_text(str(os.getpid()))  # another live process is making it
    assert quality.main(arguments) is None


def test_a_claim_is_waited_for_only_while_its_process_runs_on_this_boot(tmp_path):
    run = tmp_path / "Laser-2020.json"
    claim = run.with_suffix(".running")
    alive = os.getpid()
    for text, waits in [
        (f"{kept_runs.boot_id()} {alive}", True),  # another process of this machine makes it now
        (str(alive), True),  # a claim from before claims named the boot
        (f"another-boot {alive}", False),  # the machine restarted since: that process id is someone else's now
        (f"{kept_runs.boot_id()} 999999999", False),  # its process ended without removing it
    ]:
        claim.write_text(text)
        with kept_runs.claimed(run) as mine:
            assert mine is not waits
            if mine:  # taken over: the claim is this process's while the run is made, then gone
                assert claim.read_text() == f"{kept_runs.boot_id()} {alive}"
        assert claim.exists() is waits


def test_curves_have_a_point_per_validation_of_each_llm_model(out):
    points = read_rows(out / "curves-smoke.csv")
    for model in ("Laser", "RSLLM"):  # one epoch of 2 batches of 8 in each of their two stages
        curve = [point for point in points if point["model"] == model]
        assert [number(point["samples"]) for point in curve] == [16, 32]
        assert all(0 <= number(point["valid ndcg@10"]) <= 1 for point in curve)
        assert 0 < number(curve[0]["minutes"]) < number(curve[1]["minutes"])
    equal = [number(point["samples"]) for point in points if point["model"] == "SASRec (batch 8)"]
    assert equal == [16, 32, 48]  # SASRec at the LLM models' batch: 3 capped epochs of 2 batches of 8
    assert {point["model"] for point in points} == {"Laser", "RSLLM", "SASRec (batch 8)"}  # SASRec: a line (its best)
    assert_page(out, "curves-smoke", ["SASRec", "Laser", "SASRec (CF model of Laser)", "RSLLM"])


def test_cost_has_a_row_per_run_with_sane_figures(out):
    rows = {row["run"]: row for row in read_rows(out / "cost-smoke.csv")}
    assert list(rows) == list(load_profile("smoke").cost) == ["SASRec", "Laser", "RSLLM (unified stage)"]
    for row in rows.values():
        for key in ("train samples/s", "eval users/s", "first batch (s)", "checkpoint (MB)"):
            assert number(row[key]) > 0, key
        assert number(row["peak memory (MB)"]) > 100  # the process's peak RSS: torch alone takes more
    tiny_llm_megabytes = sum(p.numel() * p.element_size() for p in load_llm("tiny-llama").model.parameters()) / 2**20
    for label in ("Laser", "RSLLM (unified stage)"):
        row = rows[label]
        assert 0 < number(row["llm share"]) <= 1
        assert number(row["bare fwd+bwd (s)"]) > 0 and number(row["bare fwd (s)"]) > 0
        assert number(row["step / bare"]) == pytest.approx(number(row["step (s)"]) / number(row["bare fwd+bwd (s)"]))
        assert number(row["eval / bare"]) == pytest.approx(number(row["eval batch (s)"]) / number(row["bare fwd (s)"]))
        assert number(row["step / bare, CPU time"]) > 0 and number(row["eval / bare, CPU time"]) > 0
        assert number(row["llm TFLOP/s"]) < number(row["bare TFLOP/s"])  # the same FLOPs, in a longer step
        assert number(row["item matrix (s)"]) > 0
        assert number(row["checkpoint (MB)"]) < tiny_llm_megabytes  # trainable weights only, never the LLM
        assert row["llm"].startswith("tiny-llama, float32")
    assert rows["SASRec"]["llm share"] == "" and rows["SASRec"]["llm"] == ""
    assert_page(out, "cost-smoke", rows)


def test_limits_set_each_llm_pass_against_the_matmul_rate_of_its_dtype(out):
    rows = read_rows(out / "limits-smoke.csv")
    matmuls = {(row["shape"], row["dtype"]): number(row["GFLOP/s"]) for row in rows if row["kind"] == "matmul"}
    assert {("all", "float32"), ("all", "bfloat16")} <= set(matmuls) and all(rate > 0 for rate in matmuls.values())
    passes = {row["pass"]: row for row in rows if row["kind"] == "pass"}
    autocast = [f"{name}, bf16 autocast" for name in ("item matrix (Laser)", "training step (Laser)")]
    rsllm = ["training step (RSLLM, unified)", "candidate reading (RSLLM)"]
    # with cpu_bf16 (and bf16 units, faked by the fixture): each pass again as such a run computes it
    assert list(passes) == ["item matrix (Laser)", "training step (Laser)", *autocast,
                            "item matrix (Laser, no_grad_bf16)", *rsllm, *(f"{name}, bf16 autocast" for name in rsllm)]
    decoder = load_llm("tiny-llama").model.get_decoder()
    linear_weights = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    for name, row in passes.items():
        tokens, flops = number(row["tokens"]), number(row["GFLOP"]) * 1e9
        dtype = "bfloat16" if "no_grad_bf16" in name else "bfloat16 autocast" if "autocast" in name else "float32"
        assert row["dtype"] == dtype and number(row["matmul GFLOP/s"]) == matmuls[("all", dtype.split()[0])]
        assert number(row["GFLOP/s"]) == pytest.approx(number(row["GFLOP"]) / number(row["seconds"]))
        assert number(row["tokens/s"]) == pytest.approx(tokens / number(row["seconds"]))
        passes_per_token = 2 if name.startswith("training") else 1  # frozen weights: a backward's input gradients
        assert flops >= 2 * linear_weights * tokens * passes_per_token * 0.99, name  # every unpadded token's maps
    assert_page(out, "limits-smoke", [], figure=False)


def test_scale_measures_each_model_on_each_catalog_and_fits_the_growth(out):
    rows = read_rows(out / "scale-smoke.csv")
    assert [(row["model"], row["items"]) for row in rows] == [
        ("Laser", "60"), ("RSLLM", "60"), ("Laser", "120"), ("RSLLM", "120")]
    for row in rows:
        assert all(number(row[key]) > 0 for key in scale.COSTS)
        assert number(row["peak memory (MB)"]) >= number(row["peak memory after the item pass (MB)"])
    laser = [number(row["checkpoint (MB)"]) for row in rows if row["model"] == "Laser"]
    assert laser[1] > laser[0]  # Laser's checkpoint holds its item matrix: a row per item
    page = out.joinpath("scale-smoke.md").read_text()
    assert "**Growth with the catalog**" in page and "item pass slope" in page
    assert_page(out, "scale-smoke", ["Laser", "RSLLM"])


def test_cold_has_a_row_per_run_with_metrics_on_the_users_of_cold_targets(out):
    rows = read_rows(out / "cold-smoke.csv")
    assert [row["model"] for row in rows] == ["SASRec", "Laser", "RSLLM", "SASRec (CF model of the LLM models)"]
    for row in rows:
        assert number(row["cold users"]) == number(rows[0]["cold users"]) > 0  # one split: the same users
        assert 0 <= number(row["cold ndcg@10"]) <= number(row["cold recall@10"]) <= 1
    assert_page(out, "cold-smoke", [row["model"] for row in rows])
    assert "10% of the items cold" in out.joinpath("cold-smoke.md").read_text()


def test_update_readme_writes_the_pages_between_the_markers(out, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Results\n\n{BEGIN}\nold\n{END}\n\n## Next\n")
    update_readme(readme, out, profiles=("smoke", "gpu"))
    text = readme.read_text()
    assert text.startswith("# Title\n\n## Results\n\n") and text.endswith(f"{END}\n\n## Next\n") and "old" not in text
    assert "### Quality: ml-100k-tiny" in text and "### Cost: ml-100k-tiny" in text and "**Machine**" in text
    assert f"]({os.path.relpath(out, tmp_path)}/cost-smoke.png)" in text and "llm_path: tiny-llama" not in text  # figure; no profile
    assert "`python -m benchmarks.cost --profile=gpu`" in text  # a page not written yet says how to write it

    readme.write_text("# Title without markers\n")
    with pytest.raises(RecBoleLLMError, match="marker"):
        update_readme(readme, out)


def test_readme_shows_the_committed_results():
    """The README's Results section is what update_readme.py writes from benchmarks/results/ (rerun it after a
    benchmark)."""
    from benchmarks.report import REPO

    text = (REPO / "README.md").read_text()
    assert text.split(BEGIN)[1].split(END)[0].strip() == results_section().strip()


def test_unknown_profile_is_a_one_line_error():
    known = "cpu, cpu-bf16, cpu-epoch, cpu-long, cpu-picks, gpu, smoke"
    with pytest.raises(RecBoleLLMError, match=f"profile 'nope' not found: use one of {known}"):
        quality.main(["--profile=nope"])


@pytest.mark.parametrize("name", sorted(path.stem for path in PROFILES_DIR.glob("*.yaml")))
def test_every_run_of_a_committed_profile_names_a_model_and_its_settings(name, monkeypatch):
    """A typo in a profile (a model, a setting) fails here, not an hour into a benchmark."""
    monkeypatch.chdir(PROFILES_DIR.parent.parent)  # the smoke profile's data_path is relative to the repository
    profile, configs = load_profile(name), {}
    sections = [profile.cost, profile.cold, labelled_runs(profile.extra.get("equal_samples"))]
    sections += [{label: {"model": model, **(settings or {})} for label, settings in runs.items()}
                 for model, runs in (profile.extra.get("ablations") or {}).items() if model != "seeds"]
    runs = [{"model": model, **settings} for model, settings in profile.quality.items()]
    runs += [settings for section in sections for settings in section.values()]
    assert runs
    for settings in runs:
        model = settings["model"]
        if model not in configs:
            configs[model] = Config(model=model, dataset=profile.dataset, config_dict=profile.config)
        unknown = set(settings) - {"model"} - set(configs[model].final_config_dict)
        assert not unknown, f"{name}: {model} has no setting {unknown}"


def test_ablations_compare_each_setting_with_the_default_and_pop_over_the_seeds(out):
    rows = read_rows(out / "ablations-smoke.csv")
    assert [(row["model"], row["setting"]) for row in rows] == [
        ("Laser", "default"), ("Laser", "deep_prefix: False"), ("Pop", "default")]
    assert all(row["seeds"] == row["paired over seeds"] == "2020,2021" for row in rows)
    interval = r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( \*)?"
    assert re.fullmatch(interval, rows[1]["Δ test NDCG@10 vs default"])
    assert re.fullmatch(interval, rows[0]["Δ test NDCG@10 vs Pop"]) and rows[2]["Δ test NDCG@10 vs Pop"] == "-"
    assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}", rows[0]["valid NDCG@10"])
    # each Laser run against the CF SASRec it read (its seed's): the users' mean difference is the means' difference
    for row in rows[:2]:
        cf_mean = float(row["its CF model's test NDCG@10"].split(" ± ")[0])
        assert re.fullmatch(interval, row["Δ test NDCG@10 vs its CF model"])
        assert float(row["Δ test NDCG@10 vs its CF model"].split()[0]) == pytest.approx(
            float(row["test mean"]) - cf_mean, abs=2e-4)
    assert rows[2]["its CF model's test NDCG@10"] == rows[2]["Δ test NDCG@10 vs its CF model"] == "-"  # Pop reads none
    # the Laser rows answered 16 users' candidates, the same users in every run: their hits compared as NDCG@10's
    assert all(re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}", row[column]) for row in rows
               for column in ("HR@1 x VR", "HR@1 likeliest"))  # Pop too: its most popular candidate
    assert re.fullmatch(interval, rows[1]["Δ HR@1 x VR vs default"]) and rows[0]["Δ HR@1 x VR vs default"] == "-"
    assert all(re.fullmatch(interval, row["Δ HR@1 x VR vs Pop"]) for row in rows[:2])
    assert rows[2]["Δ HR@1 x VR vs Pop"] == "-"
    page = out.joinpath("ablations-smoke.md").read_text()
    assert "on the same 16 test users and candidates in every run" in page
    assert "| Laser | deep_prefix: False | 2020,2021 |" in page and "Holm" in page and "**Machine**" in page
    assert "- **Seeds** 2020, 2021, dataset ml-100k-tiny" in page  # the stamp names every seed the runs used
    # a page written later from kept runs says when they were made, not only when it was written
    ended = re.search(r"Runs ended (between \S+ \S+ and )?(\d{4}-\d\d-\d\d \d\d:\d\d) UTC, at (\w+)", page)
    assert ended and ended[2] <= f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}" and ended[3] != "an"


def test_ablations_go_on_from_the_runs_they_kept(ablation_arguments, monkeypatch):
    page = ablation_arguments[1].removeprefix("--out=") + "/ablations-smoke.md"
    before = open(page).read().split("**Settings**")[1]
    monkeypatch.setattr(ablations, "run_recbole_llm", lambda *a, **k: pytest.fail("a kept run ran again"))
    ablations.main(ablation_arguments)
    assert open(page).read().split("**Settings**")[1] == before


def test_a_setting_with_fewer_seeds_leaves_the_others_comparisons_alone(ablation_arguments, out, tmp_path,
                                                                          monkeypatch):
    shutil.copytree(out / "ablations-smoke-runs", tmp_path / "ablations-smoke-runs")
    (tmp_path / "ablations-smoke-runs" / "Laser_(deep_prefix_False)-2021.json").unlink()  # its second run to come
    monkeypatch.setattr(ablations, "claimed", lambda path: contextlib.nullcontext(False))  # nothing runs now
    ablations.main([*ablation_arguments, f"--out={tmp_path}"])
    full, partial = read_rows(out / "ablations-smoke.csv"), read_rows(tmp_path / "ablations-smoke.csv")
    assert partial[0] == full[0]  # the default's comparison with Pop still over both seeds
    assert (partial[1]["seeds"], partial[1]["paired over seeds"]) == ("2020", "2020")
    assert re.fullmatch(r"[+-]\d\.\d{4} \[.*\]( \*)?", partial[1]["Δ test NDCG@10 vs default"])


def test_the_synthetic_catalog_is_deterministic_and_loads_in_recbole(tmp_path):
    from recbole.data import create_dataset

    from benchmarks.synthetic import synthetic_dataset
    from recbole_llm.config import Config

    name = synthetic_dataset(tmp_path / "a", n_items=300, n_users=120, seed=3)
    synthetic_dataset(tmp_path / "b", n_items=300, n_users=120, seed=3)
    for suffix in (".inter", ".item"):
        first, second = (tmp_path / run / name / f"{name}{suffix}" for run in ("a", "b"))
        assert first.read_bytes() == second.read_bytes()  # the same seed, the same files
    config = Config(model="SASRec", dataset=name, config_dict={"data_path": str(tmp_path / "a"), "state": "ERROR"})
    dataset = create_dataset(config)
    assert dataset.item_num == 301 and dataset.user_num == 121  # the padding id 0 besides
    # popularity falls off as Zipf's law: the top tenth of the items holds a large share of the interactions
    top = sum(count for _, count in dataset.item_counter.most_common(30))
    assert top / dataset.inter_num > 0.25
    assert dataset.field2type["title"].name == "TOKEN_SEQ"


def test_rsllm_picks_read_the_model_with_its_id_slots_as_trained_zeroed_and_shuffled(out, cf_checkpoint):
    from recbole_llm.quick_start import load_data_and_model, run_recbole_llm

    config_dict = tiny_config(out.parent / "picks", **RSLLM_SIZES, cf_checkpoint=cf_checkpoint)
    checkpoint = run_recbole_llm("RSLLM", TINY_DATASET, config_dict=config_dict)["saved_model_file"]
    rows = rsllm_picks.main([f"--checkpoint={checkpoint}", "--users=24", "--profile=smoke", f"--out={out}"])

    assert [row["variant"] for row in rows] == [*rsllm_picks.VARIANTS, rsllm_picks.POPULARITY, rsllm_picks.CF_MODEL]
    assert [row["valid_ratio"] for row in rows[-2:]] == [1.0, 1.0]  # the ID pickers name their best-scored candidate
    for row in rows:
        assert 0 <= row["hr@1_ranked"] <= 1 and 0 <= row["valid_ratio"] <= 1
        assert 0 <= row["likeliest first"] <= row["likeliest top position"] <= 1  # shares of the 24 users' picks
    assert all(0 <= row["hr@1_ranked_scores"] <= 1 for row in rows[:3])  # RSLLM's full ranking on the same lists
    assert "hr@1_ranked_scores" not in rows[3]  # an ID picker's own ranking is its scores ("hr@1_ranked")
    assert all(re.fullmatch(r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]( \*)?", row["Δ hr@1_ranked vs as trained"])
               for row in rows[1:])
    _, model, _, _, _, test_data = load_data_and_model(checkpoint)
    items = test_data.dataset.inter_feat[model.ITEM_SEQ][:4].to(model.device)
    trained = model.id_slots(items, "unified")
    with rsllm_picks.slots_as(model, "ID slots zeroed", 2020):
        assert model.id_slots(items, "unified").abs().sum() == 0
    with rsllm_picks.slots_as(model, "ID slots shuffled", 2020) as shuffled:
        assert torch.equal(model.id_slots(items, "unified"),
                           type(model).id_slots(model, shuffled.permutation[items], "unified"))  # another item's ID
        assert not torch.equal(model.id_slots(items, "unified"), trained)
    assert torch.equal(model.id_slots(items, "unified"), trained)  # the model's own again
    assert "| ID slots shuffled |" in out.joinpath("rsllm-picks-ml-100k-tiny-24-users-seed-2020.md").read_text()

    # --variants reads the slots as trained only (each variant is a full reading): the same picks, the same ID pickers
    trained_only = rsllm_picks.main([f"--checkpoint={checkpoint}", "--users=24", "--profile=smoke", f"--out={out}",
                                     "--variants=trained"])
    assert [row["variant"] for row in trained_only] == [
        rsllm_picks.VARIANTS[0], rsllm_picks.POPULARITY, rsllm_picks.CF_MODEL
    ]
    for alone, among_all in zip(trained_only, [rows[0], *rows[-2:]]):
        assert alone["hr@1_x_valid_ratio"] == among_all["hr@1_x_valid_ratio"]
    with pytest.raises(RecBoleLLMError, match="--variants=zeroed: name some of trained, zeroed, shuffled"):
        rsllm_picks.main([f"--checkpoint={checkpoint}", "--profile=smoke", f"--out={out}", "--variants=zeroed"])
