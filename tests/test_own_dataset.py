"""A user's own dataset, as a new user runs it: item features that are not ml-100k's, named by item_text_fields, and
an LLM of their own (tiny-llama here), with no other setting: the CF model, the prompts and the LLM follow."""

import csv
import os
import subprocess
import sys

from conftest import TESTS_DIR, TINY_DATASET

REPO = os.path.dirname(TESTS_DIR)
OWN_COLUMNS = {"movie_title": "name", "release_year": "year", "class": "genre"}


def own_dataset(data_path):
    """ml-100k-tiny as the dataset 'own', its item features renamed: name, year, genre; every 25th item without a
    name (4% of them), its other features set."""
    source, folder = os.path.join(TESTS_DIR, "data", TINY_DATASET, TINY_DATASET), data_path / "own"
    folder.mkdir(parents=True)
    with open(f"{source}.inter") as inter:
        (folder / "own.inter").write_text(inter.read())
    with open(f"{source}.item") as item:
        header, rest = item.read().split("\n", 1)
    for old, new in OWN_COLUMNS.items():
        header = header.replace(f"{old}:", f"{new}:")
    rows = [row.split("\t") for row in rest.splitlines()]
    for row in rows[::25]:
        row[1] = ""  # the name
    (folder / "own.item").write_text(header + "\n" + "\n".join("\t".join(row) for row in rows) + "\n")
    return len(rows[::25]), len(rows)


def test_laser_and_rsllm_run_on_a_dataset_of_ones_own_with_only_its_item_text_fields(tmp_path):
    untitled, items = own_dataset(tmp_path / "data")
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_recbole_llm.py"), "--model=Laser,RSLLM", "--dataset=own",
         f"--data_path={tmp_path / 'data'}", "--item_text_fields=[name,year]", "--llm_path=tiny-llama"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [table] = (tmp_path / "saved").glob("comparison-own-*[0-9].csv")  # not its -users.csv
    with open(table) as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["Laser", "SASRec (CF model of Laser)", "RSLLM", "SASRec (CF model of RSLLM)"]
    assert all(0 <= float(row["test ndcg@10"]) <= 1 for row in rows.values())
    assert len(list((tmp_path / "saved").glob("cf-SASRec-own-*.pth"))) == 1  # trained once, for both
    log = next((tmp_path / "log" / "Laser").glob("*.log")).read_text()
    assert "runs its first" not in log  # tiny-llama runs whole: the CPU budget is the default LLM's
    # RSLLM writes an item by its title: one without a name is written from its other item_text_fields
    assert f"{untitled} of {items} items have no text in name, the title: written from all their" in run.stdout + run.stderr
