"""The fit check (benchmarks/fit_check.py) on tiny-llama: Laser with its switches beyond the paper memorises one
fixed batch of 32 samples, the paper's recipe on the same small LLM does not, and the prefix steers the output."""

import pytest
import torch

from benchmarks import fit_check
from conftest import LASER_SIZES, tiny_config

MODEL = "Laser"
STEPS = 100


def check_settings(workdir, cf_checkpoint, **switches):
    """The check's settings on the tiny data: Laser at the test sizes but its default M-Former and batch."""
    sizes = {key: value for key, value in LASER_SIZES.items() if not key.startswith(("n_", "mformer", "train_"))}
    own = {"dataset": "ml-100k-tiny", "steps": STEPS, "report_every": STEPS}
    return own, {**tiny_config(workdir, **sizes), "cf_checkpoint": cf_checkpoint, "stage1_epochs": 0, **switches}


@pytest.mark.parametrize(
    "switches, fits",
    [({"embedding_head": "linear", "center_embeddings": True}, True),  # Laser.yaml's defaults
     ({"embedding_head": "none", "center_embeddings": False, "deep_prefix": False}, False)],  # laser_paper.yaml's
)
def test_one_batch_is_memorised_only_with_the_switches(workdir, cf_checkpoint, switches, fits):
    torch.manual_seed(0)
    ce = fit_check.fit_check(*check_settings(workdir, cf_checkpoint, **switches))
    chance = torch.log(torch.tensor(860.0)).item()  # ml-100k-tiny's items
    if fits:
        assert ce < 1.0  # 0.26 when written; a cut gradient path or a head that never trains stays near chance
    else:
        assert 2.0 < ce < chance  # it learns, slowly: 3.1 after 100 steps when written


def test_the_prefix_steers_the_user_embedding(workdir, cf_checkpoint):
    own, overrides = check_settings(workdir, cf_checkpoint, embedding_head="linear", center_embeddings=True)
    model, _, batch = fit_check.fixed_batch_model("Laser", own["dataset"], 32, overrides)
    model.eval()
    with torch.no_grad():
        moved_once, moved_ten_times = fit_check.prefix_steering(model, batch)
    assert moved_ten_times < moved_once < 0.999  # a prefix the LLM ignores would leave the output where it was
