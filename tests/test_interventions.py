"""ablate, knockout and window: each against a direct computation of what it should be; and a new
intervention, defined here, on both engines with no change to them."""

import numpy as np
import pytest
import torch
from families import build_model
from patch_runs import ALL_SITES, engines_agree, extract, patch_job, run_intervention

from patchmap import models, synthetic
from patchmap.api import patch_heatmap
from patchmap.builtin import word_tokenizer
from patchmap.engines.hooks import (capture, hooks, knockout_hook, last_logprobs, pad_batch, patched_logprobs,
                                    position_mask, replace_hook)
from patchmap.encoding import token_lists
from patchmap.interventions import Ablate, Intervention
from patchmap.metrics import js_divergence
from patchmap.sites import COMPONENTS, Site, site_positions
from tolerances import LOGPROB_TOLERANCE, TOLERANCES, assert_datasets_close

SITES = {f"{c}-{p}": {"component": c, "positions": p} for c in COMPONENTS for p in ("subject", "last", "relation")}


def batch(pairs, tokenizer, role="target"):
    return pad_batch(token_lists(pairs, f"{role}_ids"), tokenizer.pad_token_id, "cpu")


@pytest.fixture(scope="module")
def self_pairs(tiny_model, pairs_for):
    return pairs_for(*tiny_model, examples=6, intervention="ablate")


@pytest.mark.parametrize("component", [c for c in COMPONENTS if c != "head"])  # heads: test_one_head_is_its_slice
def test_zero_ablation_equals_patching_in_zero(tiny_model, self_pairs, component):
    model, tokenizer = tiny_model
    site = Site("s", "S", component, "subject")
    layers = list(range(models.n_layers(model)))
    zero = Ablate("zero").sources(self_pairs, lambda: extract(model, tokenizer, self_pairs, [site], batch_size=6))
    ds = patch_job(model, tokenizer, self_pairs, zero, [site], batch_size=3, engine="reference")["s"]
    ids, mask, pos, lengths = batch(self_pairs, tokenizer)
    target = last_logprobs(model, ids, mask, pos, lengths)
    where = position_mask(site_positions(self_pairs, site), ids.shape[1], "cpu")
    for layer in layers:
        zeros = torch.zeros(*ids.shape, model.config.hidden_size)
        expected = js_divergence(patched_logprobs(model, component, layer, ids, mask, pos, lengths, where, zeros),
                                 target)
        torch.testing.assert_close(torch.from_numpy(ds["js"].sel(layer=layer).values), expected, atol=1e-6, rtol=0)
    assert (ds["js"].values > 0).any()


def test_mean_ablation_over_one_example_changes_nothing(tiny_model, world):
    model, tokenizer = tiny_model
    ds = patch_heatmap(model, tokenizer, synthetic.facts(world), sites=SITES, examples=1, known_only=False,
                       intervention="ablate", value="mean", progress=False)
    assert ds.sizes["example"] == 1
    # the patched run recomputes the suffix with other matrix shapes than the clean run, so JS is float32
    # rounding (1e-11 to 1e-8 seen, by thread count and load), held to the engines' own JS tolerance
    assert float(abs(ds["js"]).max()) < TOLERANCES["js"][0]


def test_mean_ablation_uses_the_dataset_mean(tiny_model, world):
    model, tokenizer = tiny_model
    ds = patch_heatmap(model, tokenizer, synthetic.facts(world), sites=SITES, examples=6, known_only=False,
                       intervention="ablate", value="mean", progress=False)
    assert float(ds["js"].max()) > 0


def test_knockout_of_no_edges_changes_nothing(tiny_model, self_pairs):
    model, tokenizer = tiny_model
    ids, mask, pos, lengths = batch(self_pairs, tokenizer)
    clean = last_logprobs(model, ids, mask, pos, lengths)
    nothing = torch.zeros(ids.shape, dtype=torch.bool)
    attn = [(models.component_module(model, "attn", l), knockout_hook(nothing, lengths - 1), "pre")
            for l in range(models.n_layers(model))]
    with hooks(attn):
        knocked = last_logprobs(model, ids, mask, pos, lengths)
    assert js_divergence(knocked, clean).max().item() < 1e-6


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_knocking_out_every_earlier_edge_equals_the_last_token_alone(tmp_path, world, family):
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    torch.manual_seed(1)
    build_model(family, len(tokenizer), layers=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = models.load(str(tmp_path))
    prompts = [f["prompt"] for f in synthetic.facts(world)[:5]]
    ids, mask, pos, lengths = pad_batch(tokenizer(prompts)["input_ids"], tokenizer.pad_token_id, "cpu")
    earlier = position_mask([list(range(n - 1)) for n in lengths.tolist()], ids.shape[1], "cpu")
    attn = [(models.component_module(model, "attn", l), knockout_hook(earlier, lengths - 1), "pre")
            for l in range(models.n_layers(model))]
    with hooks(attn):
        knocked = last_logprobs(model, ids, mask, pos, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model(input_ids=ids[i:i + 1, n - 1:n], position_ids=torch.tensor([[n - 1]])).logits[0, -1]
        torch.testing.assert_close(knocked[i], torch.log_softmax(alone.float(), -1), **LOGPROB_TOLERANCE)


def test_knockout_through_the_stages(tiny_model, world):
    model, tokenizer = tiny_model
    sites = {"subj": {"component": "attn", "positions": "subject"},
             "rest": {"component": "attn", "positions": "non_subject"},
             "last": {"component": "attn", "positions": "last"}}
    ds = patch_heatmap(model, tokenizer, synthetic.facts(world), sites=sites, examples=6, known_only=False,
                       intervention="knockout", window=3, progress=False)
    assert ds["js"].sizes == {"example": 6, "site": 3, "layer": 3}
    assert float(ds["js"].min()) >= 0 and float(ds["js"].max()) > 0


def test_window_of_one_is_plain_patching_and_wider_windows_patch_neighbours(tiny_model, pairs_for):
    model, tokenizer = tiny_model
    pairs = pairs_for(model, tokenizer, examples=6)
    site = Site("s", "S", "mlp", "subject")
    layers = list(range(models.n_layers(model)))
    acts = extract(model, tokenizer, pairs, [site], batch_size=6)
    one = patch_job(model, tokenizer, pairs, acts, [site], batch_size=6, engine="reference", window=1)["s"]
    three = patch_job(model, tokenizer, pairs, acts, [site], batch_size=6, engine="reference", window=3)["s"]
    ids, mask, pos, lengths = batch(pairs, tokenizer)
    src = batch(pairs, tokenizer, "source")
    store, _ = capture(model, *src, ["mlp"], layers)
    target = last_logprobs(model, ids, mask, pos, lengths)
    where = position_mask(site_positions(pairs, site), ids.shape[1], "cpu")
    for layer in layers:
        single = patched_logprobs(model, "mlp", layer, ids, mask, pos, lengths, where, store[("mlp", layer)])
        torch.testing.assert_close(torch.from_numpy(one["js"].sel(layer=layer).values), js_divergence(single, target),
                                   atol=1e-6, rtol=0)
        neighbours = [l for l in (layer - 1, layer, layer + 1) if 0 <= l < len(layers)]
        with hooks([(models.component_module(model, "mlp", l), replace_hook(where, store[("mlp", l)]))
                    for l in neighbours]):
            window = last_logprobs(model, ids, mask, pos, lengths)
        torch.testing.assert_close(torch.from_numpy(three["js"].sel(layer=layer).values), js_divergence(window, target),
                                   atol=1e-6, rtol=0)


def test_one_head_is_its_slice_of_the_output_projections_input(world, pairs_for):
    """Patching head h of a head site writes the source's slice h of the input of the attention's output
    projection (o_proj, [.., heads x head dim]) at the site's positions, the other heads untouched: here
    by hand, with a pre-hook on o_proj, against the reference engine (a Llama with 4 query heads and 2
    key/value heads, large random weights so that single heads move the distribution)."""
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    torch.manual_seed(0)
    model = build_model("llama", len(tokenizer), layers=3, init=0.3, pad_token_id=tokenizer.pad_token_id).eval()
    pairs = pairs_for(model, tokenizer, examples=6)
    site = Site("heads", "Heads", "head", "subject")
    ds = patch_job(model, tokenizer, pairs, extract(model, tokenizer, pairs, [site]), [site], batch_size=6,
                   engine="reference")["heads"]
    ids, mask, pos, lengths = batch(pairs, tokenizer)
    target = last_logprobs(model, ids, mask, pos, lengths)
    where = position_mask(site_positions(pairs, site), ids.shape[1], "cpu")
    heads, head_dim = models.head_shape(model)
    for layer in range(models.n_layers(model)):
        o_proj = model.model.layers[layer].self_attn.o_proj
        store = {}

        def keep(module, args, kwargs):
            store["x"] = args[0]
        with hooks([(o_proj, keep, "pre")]):
            last_logprobs(model, *batch(pairs, tokenizer, "source"))
        for head in range(heads):
            def write(module, args, kwargs, head=head):
                x = args[0].clone()
                part = slice(head * head_dim, (head + 1) * head_dim)
                x[..., part] = torch.where(where[..., None], store["x"][..., part], x[..., part])
                return (x,), kwargs
            with hooks([(o_proj, write, "pre")]):
                patched = last_logprobs(model, ids, mask, pos, lengths)
            torch.testing.assert_close(torch.from_numpy(ds["js"].sel(layer=layer, head=head).values),
                                       js_divergence(patched, target), atol=1e-6, rtol=0)
    assert float(ds["js"].max()) > 0.01


class Scale(Intervention):
    """A new intervention, defined here: the site's activation times `factor` (each fact its own source)."""
    name = "scale"

    def __init__(self, factor):
        self.factor = factor

    def write(self, base, source):
        return base * self.factor


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_an_intervention_defined_in_a_test_runs_on_both_engines(tiny_model, self_pairs, factor):
    """No engine, stages.py or api.py knows Scale: it gives the engines its write strategy. Scaling by 0 is
    zero ablation, number for number, on each engine; by 0.5 it moves the distribution less."""
    model, tokenizer = tiny_model
    sites = [s for s in ALL_SITES if s.positions in ("subject", "last", "relation")]
    sources = Scale(factor).sources(self_pairs, lambda: extract(model, tokenizer, self_pairs, sites, batch_size=6))
    reference, fast, _ = engines_agree(model, tokenizer, self_pairs, sources, sites, batch_size=3,
                                       intervention=Scale(factor))
    zero = Ablate("zero").sources(self_pairs, lambda: extract(model, tokenizer, self_pairs, sites, batch_size=6))
    for engine, scaled in (("reference", reference), ("fast", fast)):
        ablated = patch_job(model, tokenizer, self_pairs, zero, sites, batch_size=3, engine=engine,
                            intervention=run_intervention("ablate", value="zero"))
        if factor == 0:
            for name in ablated:
                for metric in ablated[name].data_vars:
                    np.testing.assert_array_equal(scaled[name][metric].values, ablated[name][metric].values)
        else:
            for name in ablated:
                assert float(scaled[name]["js"].mean()) < float(ablated[name]["js"].mean()), name


def test_the_python_api_takes_an_intervention_object(tiny_model, world):
    model, tokenizer = tiny_model
    kwargs = dict(sites=SITES, examples=4, known_only=False, progress=False)
    scaled = patch_heatmap(model, tokenizer, synthetic.facts(world), intervention=Scale(0.0), **kwargs)
    ablated = patch_heatmap(model, tokenizer, synthetic.facts(world), intervention="ablate", value="zero", **kwargs)
    assert scaled.attrs["intervention"] == "scale"
    assert_datasets_close({"all": ablated}, {"all": scaled})
