"""The shipped default model shows the paper figure's three stages (checked through the Python API,
independent of results/), and its swap pairs differ only in the subject."""

import pytest

from patchmap import builtin, models, synthetic, summary
from patchmap.api import patch_heatmap
from test_builtin import default_config


@pytest.fixture(scope="module")
def default_heatmap():
    config = default_config()
    spec = config["models"]["facts-llama"]["builtin"]
    world = config["datasets"][spec["dataset"]]["synthetic"]
    shape = {k: spec[k] for k in ("layers", "hidden", "heads", "mlp")}
    shipped = builtin.shipped_model(builtin.training_spec(world, shape, spec["train"]))
    model, tokenizer = models.load(str(shipped))
    facts = synthetic.facts(synthetic.make_world(**world))
    return patch_heatmap(model, tokenizer, facts, examples=60, batch_size=30, progress=False)


def test_the_shipped_model_answers_every_question(default_heatmap):
    assert default_heatmap.attrs["count_dropped_not_known"] == 0
    assert default_heatmap.attrs["count_pairs"] == 60
    assert default_heatmap.attrs["count_pairs_differing_outside_subject"] == 0


def test_the_default_figure_shows_three_stages(default_heatmap):
    stages = summary.three_stages(default_heatmap["js_mean"])
    assert stages["subject_falls"], stages
    assert stages["last_rises"], stages
    assert stages["attention_peaks_in_the_fall"], stages


def test_the_subject_carries_the_whole_difference_at_the_first_layer(default_heatmap):
    assert summary.subject_ratio(default_heatmap["js_mean"]) > 0.9
