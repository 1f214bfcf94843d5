import numpy as np
import pytest
import torch
import xarray as xr

from patch_runs import ALL_SITES, extract, patch_job

from patchmap import models, synthetic
from patchmap.api import patch_heatmap
from patchmap.engines.hooks import capture, pad_batch, patched_logprobs, position_mask
from patchmap.errors import UserError
from patchmap.encoding import token_lists
from patchmap.sites import Site
from tolerances import LOGPROB_TOLERANCE, assert_datasets_close


@pytest.fixture(scope="module")
def pairs(tiny_model, pairs_for):
    return pairs_for(*tiny_model, examples=10)


def self_pairs(pairs):
    """Each target as its own source."""
    ds = pairs.copy()
    ds["source_ids"] = ds["target_ids"]
    ds["source_answer"] = ds["target_answer"]
    return ds


def run_sites(model, tokenizer, pairs, sites, batch_size=4):
    acts = extract(model, tokenizer, pairs, sites, batch_size=batch_size)
    return patch_job(model, tokenizer, pairs, acts, sites, batch_size=batch_size, engine="reference")


def test_pairs_line_up(pairs):
    assert pairs.sizes["example"] == 10
    t, s = token_lists(pairs, "target_ids"), token_lists(pairs, "source_ids")
    assert all(len(a) == len(b) for a, b in zip(t, s))
    assert (pairs["target_answer"] != pairs["source_answer"]).all()
    for a, b, start, end in zip(t, s, pairs["subject_start"].values, pairs["subject_end"].values):
        assert end - start == 3 and a[start:end] != b[start:end]


def test_patching_the_targets_own_activation_changes_nothing(tiny_model, pairs):
    model, tokenizer = tiny_model
    results = run_sites(model, tokenizer, self_pairs(pairs), ALL_SITES)
    for name, ds in results.items():
        assert (ds["js"].values == 0).all(), name
        assert (ds["kl_patched_target"].values == 0).all(), name


def test_patching_every_position_at_the_last_layer_gives_the_source_distribution(tiny_model, pairs):
    model, tokenizer = tiny_model
    last = models.n_layers(model) - 1
    ids, mask, pos, lengths = pad_batch(token_lists(pairs, "target_ids"), tokenizer.pad_token_id, "cpu")
    src = pad_batch(token_lists(pairs, "source_ids"), tokenizer.pad_token_id, "cpu")
    store, source_logprobs = capture(model, *src, ["resid"], [last])
    everywhere = position_mask([list(range(n)) for n in lengths.tolist()], ids.shape[1], "cpu")
    patched = patched_logprobs(model, "resid", last, ids, mask, pos, lengths, everywhere, store[("resid", last)])
    torch.testing.assert_close(patched, source_logprobs, **LOGPROB_TOLERANCE)
    # and through the stages: JS against the target equals JS between source and target
    site = Site("all", "All", "resid", "all")
    ds = run_sites(model, tokenizer, pairs, [site])["all"]
    assert ds["flip"].sel(layer=last).values.mean() == (source_logprobs.argmax(-1) == torch.as_tensor(
        pairs["source_answer"].values)).float().mean().item()


def test_batching_with_padding_equals_one_at_a_time(tiny_model, pairs_for):
    model, tokenizer = tiny_model
    pairs = pairs_for(model, tokenizer, examples=12, seed=1)
    assert len(set(pairs["length"].values.tolist())) > 1, "the test needs prompts of different lengths"
    together = run_sites(model, tokenizer, pairs, ALL_SITES[:6], batch_size=12)
    alone = run_sites(model, tokenizer, pairs, ALL_SITES[:6], batch_size=1)
    assert_datasets_close(alone, together)


def test_unknown_architecture_is_named(tmp_path):
    from transformers import BertConfig, BertLMHeadModel
    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported model architecture 'bert'; supported: .*llama"):
        models.load(str(tmp_path))


def test_missing_model_path_is_reported(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        models.load(str(tmp_path / "nowhere"))


def test_api_returns_the_workflow_dataset(tiny_model, world):
    model, tokenizer = tiny_model
    ds = patch_heatmap(model, tokenizer, synthetic.facts(world), examples=8, known_only=False, progress=False)
    assert isinstance(ds, xr.Dataset)
    assert ds["js"].dims == ("example", "site", "layer")
    assert list(ds["site"].values) == ["Subj.", "Attn.", "Last."]
    assert {k: ds.sizes[k] for k in ("example", "site", "layer", "rank")} == \
        {"example": 8, "site": 3, "layer": models.n_layers(model), "rank": 5}
    assert ds["top_token"].dims == ("example", "site", "layer", "rank")
    assert ds["target_top_token"].dims == ("example", "rank")
    probs = ds["top_prob"].values
    assert (np.diff(probs, axis=-1) <= 0).all() and (probs.sum(-1) <= 1 + 1e-6).all()
    named = set(np.unique(ds["top_token"].values)) | set(np.unique(ds["target_top_token"].values))
    assert named <= set(ds["token_id"].values.tolist())
    assert ds["token_text"].sel(token_id=int(ds["target_top_token"][0, 0])).item() == \
        tokenizer.decode([int(ds["target_top_token"][0, 0])])
    assert ((ds["js_ci_low"] <= ds["js_mean"] + 1e-12) & (ds["js_mean"] <= ds["js_ci_high"] + 1e-12)).all()
    assert float(ds["js"].min()) >= 0 and float(ds["js"].max()) <= 1
