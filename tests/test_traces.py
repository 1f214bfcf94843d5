"""Token traces (patchmap.traces, the Python API's trace): what a cell means, both engines, and the file a
trace writes; tests/test_heads_and_traces_workflow.py runs them through the workflow."""

import numpy as np
import pytest
import torch
from families import build_model
from tolerances import TOLERANCES, assert_metric_close

from patchmap import models, synthetic
from patchmap.api import trace
from patchmap.builtin import word_tokenizer
from patchmap.errors import UserError
from patchmap.interventions import outside_subject
from patchmap.encoding import encode_facts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp(world):
    """A Llama with 4 query and 2 key/value heads and large random weights: noise and swaps move its
    distributions far."""
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    torch.manual_seed(0)
    model = build_model("llama", len(tokenizer), layers=4, init=0.3, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).eval()
    return model, tokenizer


def swap_pair(tokenizer, facts):
    """Two facts whose prompts differ only in the subject (same tokens elsewhere), with other answers."""
    encoded, _ = encode_facts(tokenizer, facts)
    for i, a in enumerate(encoded):
        for b in encoded[i + 1:]:
            if outside_subject(a) == outside_subject(b) and a["answer"] != b["answer"]:
                return a, b
    raise AssertionError("no swap pair in the facts")


def test_a_noise_trace_is_labelled_and_restoring_the_last_state_restores_the_answer(sharp, world):
    model, tokenizer = sharp
    facts = synthetic.facts(world)
    ds = trace(model, tokenizer, facts[0], facts=facts, noise_samples=3, window={"mlp": 3, "attn": 2}, progress=False)
    n = len(tokenizer(facts[0]["prompt"])["input_ids"])
    assert ds["js"].dims == ("component", "token", "layer")
    assert ds.sizes == {"component": 3, "token": n, "layer": 4}
    assert list(ds["component"].values) == ["resid", "mlp", "attn"] and list(ds["window"].values) == [1, 3, 2]
    assert " ".join(ds["token_text"].values[1:]) == facts[0]["prompt"]  # after <bos>
    assert " ".join(ds["token_text"].values[ds["subject"].values]) == facts[0]["subject"]
    assert ds.attrs["noise_samples"] == 3 and ds.attrs["answer"] == facts[0]["attribute"]
    unpatched, corrupted = float(ds["p_answer_unpatched"]), float(ds["p_answer_corrupted"])
    assert float(ds["js"].sel(component="resid").values[-1, -1]) > 0.05  # JS(clean, noised): the noise moved it
    # the last token's state after the last block fixes the output: restoring it there is the clean prompt
    assert_metric_close("p_target_answer", ds["p_target_answer"].sel(component="resid").values[-1, -1], unpatched)
    # tokens before the subject are the same in the clean and the noised prompt: restoring them changes nothing
    before = ds["p_target_answer"].sel(component="resid").values[:int(np.argmax(ds["subject"].values))]
    assert_metric_close("p_target_answer", before, np.full(before.shape, corrupted))


def test_a_swap_trace_patches_the_sources_states(sharp, world):
    model, tokenizer = sharp
    target, source = swap_pair(tokenizer, synthetic.facts(world))
    ds = trace(model, tokenizer, target, source=source, intervention="swap", components=["resid"], progress=False)
    assert ds.attrs["source_id"] == source["id"] and ds.attrs["intervention"] == "swap"
    resid = ds.sel(component="resid")
    # patching the source's last state after the last block gives the source's run: its p of the target's answer
    assert_metric_close("p_target_answer", resid["p_target_answer"].values[-1, -1], float(ds["p_answer_corrupted"]))
    assert float(resid["js"].values[-1, -1]) > 0.05
    # tokens before the subject have the same states in both prompts: patching them changes nothing
    before = resid["js"].values[:int(np.argmax(ds["subject"].values))]
    assert len(before) and np.abs(before).max() < TOLERANCES["js"][0]


@pytest.mark.parametrize("intervention", ["noise", "swap"])
def test_both_engines_trace_the_same(sharp, world, intervention):
    model, tokenizer = sharp
    target, source = swap_pair(tokenizer, synthetic.facts(world))
    source = source if intervention == "swap" else None
    kwargs = dict(source=source, intervention=intervention, window={"mlp": 2, "attn": 3}, noise_samples=2,
                  progress=False)
    fast, reference = (trace(model, tokenizer, target, engine=engine, **kwargs) for engine in ("fast", "reference"))
    for metric in TOLERANCES:
        assert_metric_close(metric, fast[metric].values, reference[metric].values, f"trace {intervention}")
    assert float(reference["js"].max()) > 0.05


def test_a_swap_source_of_another_length_is_refused(sharp, world):
    model, tokenizer = sharp
    facts = synthetic.facts(world)
    longer = next(f for f in facts if len(f["prompt"].split()) != len(facts[0]["prompt"].split()))
    with pytest.raises(UserError, match="a swap trace needs prompts of the same token length"):
        trace(model, tokenizer, facts[0], source=longer, intervention="swap", progress=False)


def test_the_layers_are_the_models(sharp, world):
    model, tokenizer = sharp
    ds = trace(model, tokenizer, synthetic.facts(world)[1], components=["attn"], noise_samples=1, progress=False)
    assert list(ds["layer"].values) == list(range(models.n_layers(model)))
    assert ds["subject"].dtype == bool and ds["flip"].dtype == np.int8
