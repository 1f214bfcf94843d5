"""The noise intervention (ROME-style): restoring the clean run undoes the corruption."""

import numpy as np
import pytest
import torch
from patch_runs import extract, patch_job, run_intervention
from tolerances import LOGPROB_TOLERANCE

from patchmap.engines.hooks import (capture, hooks, last_logprobs, noise_hooks, pad_batch, patched_logprobs,
                                    position_mask)
from patchmap.metrics import js_divergence
from patchmap.encoding import token_lists
from patchmap.sites import Site

NOISE = run_intervention("noise", noise_scale=3.0)


@pytest.fixture(scope="module")
def noise_pairs(tiny_model, pairs_for):
    return pairs_for(*tiny_model, examples=8, intervention="noise", noise_scale=3.0)


def test_noise_pairs_are_clean_sources_of_themselves(noise_pairs):
    assert (noise_pairs["source_ids"].values == noise_pairs["target_ids"].values).all()
    assert (noise_pairs["source_answer"].values == noise_pairs["target_answer"].values).all()
    assert noise_pairs.attrs["noise_std"] == pytest.approx(3.0 * noise_pairs.attrs["subject_embedding_std"])
    assert len(set(noise_pairs["noise_seed"].values.tolist())) == 8


def test_noise_is_only_on_subject_tokens_and_seeded(noise_pairs):
    n, width = noise_pairs.sizes["example"], noise_pairs.sizes["token"]
    a = NOISE.target_noise(noise_pairs, 0, n, width, 16)
    b = NOISE.target_noise(noise_pairs, 0, n, width, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for i in range(n):
        start, end = int(noise_pairs["subject_start"][i]), int(noise_pairs["subject_end"][i])
        assert a[i, start:end].abs().sum() > 0
        assert a[i, :start].abs().sum() == 0 and a[i, end:].abs().sum() == 0
    # a shard computes the same noise for an example as the whole set does
    torch.testing.assert_close(NOISE.target_noise(noise_pairs, 3, 5, width, 16), a[3:5], rtol=0, atol=0)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_restoring_every_position_recovers_the_clean_distribution(tiny_model, noise_pairs, layer):
    model, tokenizer = tiny_model
    hidden = model.config.hidden_size
    ids, mask, pos, lengths = pad_batch(token_lists(noise_pairs, "target_ids"), tokenizer.pad_token_id, "cpu")
    clean_store, clean = capture(model, ids, mask, pos, lengths, ["resid"], [layer])
    noise = NOISE.target_noise(noise_pairs, 0, len(lengths), ids.shape[1], hidden)
    everywhere = position_mask([list(range(n)) for n in lengths.tolist()], ids.shape[1], "cpu")
    with hooks(noise_hooks(model, noise)):
        corrupted = last_logprobs(model, ids, mask, pos, lengths)
        restored = patched_logprobs(model, "resid", layer, ids, mask, pos, lengths, everywhere,
                                    clean_store[("resid", layer)])
    assert js_divergence(corrupted, clean).min() > 0  # the noise did something
    assert js_divergence(restored, clean).max().item() < 1e-6
    torch.testing.assert_close(restored, clean, **LOGPROB_TOLERANCE)


def test_noise_through_the_stages(tiny_model, noise_pairs):
    model, tokenizer = tiny_model
    site = Site("all", "All", "resid", "all")
    acts = extract(model, tokenizer, noise_pairs, [site])
    ds = patch_job(model, tokenizer, noise_pairs, acts, [site], engine="reference")["all"]
    # every position restored: the clean answer's probability is the clean run's, at every layer
    clean_p = noise_pairs["target_p_answer"].values[:, None]
    np.testing.assert_allclose(ds["p_target_answer"].values, np.broadcast_to(clean_p, ds["p_target_answer"].shape),
                               atol=1e-5)
    assert (ds["js"].values > 0).all()  # compared with the corrupted run, which differs
