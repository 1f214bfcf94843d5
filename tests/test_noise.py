"""The noise intervention (ROME-style): restoring the clean run undoes the corruption; noise samples average
the copies' distributions."""

import numpy as np
import pytest
import torch
from families import build_model
from patch_runs import extract, patch_job, run_intervention
from tolerances import LOGPROB_TOLERANCE, TOLERANCES, assert_metric_close

from patchmap import models, synthetic
from patchmap.builtin import word_tokenizer
from patchmap.engines.hooks import (capture, hooks, last_logits, last_logprobs, noise_hooks, pad_batch, patched_logits,
                                    patched_logprobs,
                                    position_mask)
from patchmap.metrics import Targets, js_divergence, patch_metrics
from patchmap.encoding import token_lists
from patchmap.sites import Site, site_positions

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


def noise_by_hand(pairs, samples, width, hidden):
    """[samples][n, T, H]: copy k of each example's noise, the (k + 1)-th draw of its seed's generator."""
    draws = [torch.zeros(pairs.sizes["example"], width, hidden) for _ in range(samples)]
    for i, seed in enumerate(pairs["noise_seed"].values):
        start, end = int(pairs["subject_start"][i]), int(pairs["subject_end"][i])
        generator = torch.Generator().manual_seed(int(seed))
        for k in range(samples):
            draws[k][i, start:end] = torch.randn(end - start, hidden, generator=generator) * pairs.attrs["noise_std"]
    return draws


def metrics_by_hand(model, tokenizer, pairs, site, samples):
    """{metric: [example, layer]} of `site` under noise with `samples` copies, computed with hooks: per copy
    the noised target, unpatched and with the clean activation restored at each layer; the copies'
    probabilities averaged (one copy: its own log-probs); then the metrics of the averages."""
    layers = list(range(models.n_layers(model)))
    ids, mask, pos, lengths = pad_batch(token_lists(pairs, "target_ids"), tokenizer.pad_token_id, "cpu")
    clean, _ = capture(model, ids, mask, pos, lengths, [site.component], layers)
    where = position_mask(site_positions(pairs, site), ids.shape[1], "cpu")
    target, patched = [], {layer: [] for layer in layers}
    for noise in noise_by_hand(pairs, samples, ids.shape[1], model.config.hidden_size):
        with hooks(noise_hooks(model, noise)):
            target.append(last_logits(model, ids, mask, pos, lengths))
            for layer in layers:
                patched[layer].append(patched_logits(model, site.component, layer, ids, mask, pos, lengths, where,
                                                     clean[(site.component, layer)]))

    def mean(logits):
        return torch.stack([torch.log_softmax(x, -1) for x in logits]).exp().mean(0).log()
    answers = [torch.as_tensor(pairs[f"{role}_answer"].values) for role in ("target", "source")]
    rows = torch.arange(len(lengths))
    if samples == 1:  # one run's logits, compared as they are (patch_metrics makes them log-probs)
        targets = Targets.from_logits(target[0])
        per_layer = [patch_metrics(patched[layer][0], targets, rows, *answers, logits=True) for layer in layers]
    else:
        targets = Targets(mean(target))
        per_layer = [patch_metrics(mean(patched[layer]), targets, rows, *answers) for layer in layers]
    return {k: torch.stack([m[k] for m in per_layer], 1).numpy() for k in per_layer[0]}


SAMPLED = [Site("subj", "Subj.", "resid", "subject"), Site("mlp", "MLP", "mlp", "last")]


@pytest.fixture(scope="module")
def sharp(world, pairs_for):
    """A Llama with large random weights (noise moves its distributions far) and its noise pairs."""
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    torch.manual_seed(0)
    model = build_model("llama", len(tokenizer), layers=3, init=0.3, pad_token_id=tokenizer.pad_token_id).eval()
    return model, tokenizer, pairs_for(model, tokenizer, examples=8, intervention="noise", noise_scale=3.0)


def test_one_noise_sample_is_the_single_noise_bit_for_bit(sharp):
    """noise_samples 1 (the default) adds the seed's single draw and averages nothing: the reference engine
    gives exactly the numbers of the noised run computed directly (as before noise samples existed)."""
    model, tokenizer, noise_pairs = sharp
    n, width = noise_pairs.sizes["example"], noise_pairs.sizes["token"]
    one = run_intervention("noise", noise_samples=1)
    assert torch.equal(one.target_noise(noise_pairs, 0, n, width, 16), noise_by_hand(noise_pairs, 1, width, 16)[0])
    acts = extract(model, tokenizer, noise_pairs, SAMPLED, batch_size=n)  # the clean run of the batch by hand
    ds = patch_job(model, tokenizer, noise_pairs, acts, SAMPLED, batch_size=n, engine="reference", intervention=one)
    for site in SAMPLED:
        expected = metrics_by_hand(model, tokenizer, noise_pairs, site, samples=1)
        for metric, values in expected.items():
            np.testing.assert_array_equal(ds[site.name][metric].values, values, err_msg=f"{site.name} {metric}")


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_noise_samples_average_the_copies_distributions(sharp, engine):
    """With 3 samples the metrics are those of the mean of the 3 one-sample distributions (computed by hand
    here), unpatched and patched alike; they differ from one sample's."""
    model, tokenizer, noise_pairs = sharp
    acts = extract(model, tokenizer, noise_pairs, SAMPLED)
    three = patch_job(model, tokenizer, noise_pairs, acts, SAMPLED, batch_size=3, engine=engine,
                      intervention=run_intervention("noise", noise_samples=3))
    one = patch_job(model, tokenizer, noise_pairs, acts, SAMPLED, batch_size=3, engine=engine)
    for site in SAMPLED:
        by_hand = metrics_by_hand(model, tokenizer, noise_pairs, site, samples=3)
        for metric in TOLERANCES:
            assert_metric_close(metric, three[site.name][metric].values, by_hand[metric], f"{engine} {site.name}")
        assert float(three[site.name]["js"].max()) > 0.05  # far above the tolerance
        assert np.abs(three[site.name]["js"].values - one[site.name]["js"].values).max() > 1e-2
