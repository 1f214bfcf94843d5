"""The shipped default model shows the paper figure's three stages (checked through the Python API,
independent of results/), and its swap pairs differ only in the subject."""

import pytest
import xarray as xr

from patchmap import models, summary, synthetic
from patchmap.api import patch_heatmap
from test_builtin import default_config, default_spec, shipped_default


@pytest.fixture(scope="module")
def default_heatmap():
    config = default_config()
    model, tokenizer = models.load(str(shipped_default(config)))
    world, _, _ = default_spec(config)
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


def heatmap_of(rows):
    """A js_mean (site x layer) from rows of numbers."""
    return xr.DataArray([rows[s] for s in ("Subj.", "Attn.", "Last.")], dims=("site", "layer"),
                        coords={"site": ["Subj.", "Attn.", "Last."], "layer": list(range(len(rows["Subj."])))})


PAPER_LIKE = {"Subj.": [.95, .95, .9, .7, .3, .05, 0, 0], "Attn.": [0, 0, .1, .3, .4, .2, 0, 0],
              "Last.": [.05, .05, .1, .3, .7, .9, .95, 1.0]}


def test_the_three_stage_checks_accept_the_paper_shape():
    stages = summary.three_stages(heatmap_of(PAPER_LIKE))
    assert stages["subject_falls"] and stages["last_rises"] and stages["attention_peaks_in_the_fall"], stages
    assert stages["subject_fall_layers"] == (3, 5) and stages["attention_peak_layer"] == 4
    assert summary.subject_ratio(heatmap_of(PAPER_LIKE)) == pytest.approx(0.95)


@pytest.mark.parametrize("site, row, check", [
    ("Subj.", [.95] * 8, "subject_falls"),                                   # never falls
    ("Last.", [.9, .9, .9, .9, .9, .95, .95, 1.0], "last_rises"),            # high from the start
    ("Attn.", [.5, 0, .1, .3, .4, .2, 0, 0], "attention_peaks_in_the_fall"),  # peaks before the fall
])
def test_the_three_stage_checks_reject_other_shapes(site, row, check):
    assert not summary.three_stages(heatmap_of({**PAPER_LIKE, site: row}))[check]
