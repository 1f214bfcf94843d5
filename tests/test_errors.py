"""Bad input: each mistake gets one line naming the culprit (a UserError), never a traceback."""

import copy
import json

import numpy as np
import pytest
import torch
import xarray as xr

from patch_runs import extract, patch

from patchmap import config as cfg
from patchmap import models, synthetic
from patchmap.data import read_facts
from patchmap.errors import UserError
from patchmap.pairs import encode_facts, make_pairs
from patchmap.sites import Site

BASE = {
    "models": {"m": {"path": "some/model"}},
    "datasets": {"d": {"path": "facts.jsonl"}},
    "sites": {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
              "last": {"label": "Last.", "component": "resid", "positions": "last"}},
    "runs": {"r": {"model": "m", "dataset": "d", "sites": ["subj", "last"]}},
}


def check(config):
    return cfg.validate(copy.deepcopy(config))


def error_of(config):
    with pytest.raises(UserError) as info:
        check(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def with_change(path, value):
    config = copy.deepcopy(BASE)
    *parents, key = path
    node = config
    for p in parents:
        node = node[p]
    node[key] = value
    return config


def test_the_base_config_is_valid():
    checked = check(BASE)
    assert checked["runs"]["r"]["intervention"] == "swap" and checked["runs"]["r"]["layers"] == "all"


# 1. malformed JSON / JSONL, with the line number
def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "facts.jsonl"
    good = json.dumps({"subject": "A", "prompt": "A is in", "attribute": "B"})
    path.write_text(good + "\n" + good + "\n{\"subject\": \"A\", \n")
    with pytest.raises(UserError, match=r"facts.jsonl: line 3 is not valid JSON"):
        read_facts(path)


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "known.json"
    path.write_text('[\n {"subject": "A", "prompt": "A is", "attribute": "B"},\n {"subject": }\n]')
    with pytest.raises(UserError, match=r"malformed JSON at line 3"):
        read_facts(path)


# 2. a subject that does not occur in its prompt: dropped (counted) or fatal, per config
def test_subject_not_in_prompt(tiny_model):
    _, tokenizer = tiny_model
    facts = [{"id": "f1", "subject": "Abel Bran Cato", "relation": "city", "prompt": "Abel Bran Cato lives in the city of",
              "attribute": "Paris"},
             {"id": "f2", "subject": "Dara Eno", "relation": "city", "prompt": "Abel lives in the city of",
              "attribute": "Paris"}]
    encoded, dropped = encode_facts(tokenizer, facts, "drop")
    assert [f["id"] for f in encoded] == ["f1"] and dropped == 1
    with pytest.raises(UserError, match="fact f2: subject 'Dara Eno' does not occur in its prompt"):
        encode_facts(tokenizer, facts, "error")


# 3. an empty or missing attribute
@pytest.mark.parametrize("row, field", [({"subject": "A", "prompt": "A is in"}, "attribute"),
                                        ({"subject": "A", "prompt": "A is in", "attribute": " "}, "attribute"),
                                        ({"subject": "", "prompt": "A is in", "attribute": "B"}, "subject")])
def test_missing_or_empty_fields(tmp_path, row, field):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"subject": "A", "prompt": "A is in", "attribute": "B"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f"line 2: field '{field}' is missing or empty"):
        read_facts(path)


# 4. unknown component or position group
def test_unknown_component_and_position_group():
    assert error_of(with_change(["sites", "subj", "component"], "residual")) == (
        "config error at sites.subj.component: 'residual' is not one of ['resid', 'attn', 'mlp']")
    assert "config error at sites.last.positions: 'final' is not one of ['subject', 'subject_first'" in \
        error_of(with_change(["sites", "last", "positions"], "final"))


# 5. a layer out of range for the model
def test_layer_out_of_range():
    with pytest.raises(UserError, match="runs.r.layers: layer 9 is out of range; the model has layers 0 to 2"):
        cfg.resolve_layers([0, 9], 3, "runs.r.layers")
    builtin = copy.deepcopy(BASE)
    builtin["datasets"]["d"] = {"synthetic": {}}
    builtin["models"]["m"] = {"builtin": {"dataset": "d", "layers": 4}}
    builtin["runs"]["r"]["layers"] = [1, 4]
    assert "runs.r.layers: layer 4 is out of range; model 'm' has layers 0 to 3" in error_of(builtin)


# 6 and 7 (unknown architecture, missing model path) are in test_engine.py

# 8. device cuda on a machine without a GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_model_dir):
    with pytest.raises(UserError, match="device 'cuda' was asked for but no CUDA GPU is available"):
        models.load(str(tiny_model_dir), device="cuda")


# 9. any schema violation names the key path and what is allowed
@pytest.mark.parametrize("path, value, expected", [
    (["runs", "r", "examples"], 0, "config error at runs.r.examples: 0 is less than the minimum of 1"),
    (["runs", "r", "dtype"], "fp8", "config error at runs.r.dtype: 'fp8' is not one of ['float32', 'bfloat16', 'float16']"),
    (["runs", "r", "device"], "gpu", "config error at runs.r.device: 'gpu' does not match"),
    (["runs", "r", "model"], "other", "config error at runs.r.model: 'other' is not defined; defined models: m"),
    (["models", "m"], {"path": "x", "builtin": {"dataset": "d"}}, "config error at models.m: give exactly one of 'builtin' or 'path'"),
    (["runs", "r", "batchsize"], 3, "config error at runs.r: Additional properties are not allowed ('batchsize' was unexpected)"),
])
def test_schema_violations(path, value, expected):
    assert error_of(with_change(path, value)).startswith(expected)


def test_path_breaking_run_name_is_rejected():
    config = copy.deepcopy(BASE)
    config["runs"]["../escape"] = config["runs"].pop("r")
    assert error_of(config).startswith("config error at runs: '../escape' does not match")


# 10. two sites with the same label
def test_duplicate_site_labels():
    assert error_of(with_change(["sites", "last", "label"], "Subj.")) == (
        "config error at sites.last: label 'Subj.' is already used by site 'subj'; labels name figure rows "
        "and must be unique")


# 10b. a knockout that would block every key of the last token
def test_knockout_of_every_position_is_rejected():
    config = with_change(["sites", "last", "positions"], "all")
    config["runs"]["r"]["intervention"] = "knockout"
    assert error_of(config).startswith("config error at runs.r.sites: knockout at site 'last' (positions 'all') "
                                       "would block every token the last one attends to")
    config["runs"]["r"]["intervention"] = "swap"
    check(config)


# 11. a dataset that is empty after filtering or pairing
def test_nothing_left_after_filtering(tiny_model, world):
    model, tokenizer = tiny_model
    facts = synthetic.facts(world)
    with pytest.raises(UserError, match="no pairs left after filtering and pairing"):
        make_pairs(model, tokenizer, facts, examples=5, seed=0, known_only=True)  # a random model knows nothing
    lonely = [facts[0]]
    with pytest.raises(UserError, match="'dropped_no_partner': 1"):
        make_pairs(model, tokenizer, lonely, examples=5, seed=0, known_only=False)


# 12. a tokenizer without offset mappings (slow)
def test_slow_tokenizer_is_refused(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, ByT5Tokenizer
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    ByT5Tokenizer().save_pretrained(tmp_path)  # a pure-Python tokenizer: no offset mappings
    with pytest.raises(UserError, match="is a slow tokenizer without offset mappings"):
        models.load(str(tmp_path))


def test_pickled_weights_need_permission(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    with pytest.raises(UserError, match="has no safetensors weights; set allow_pickle: true"):
        models.load(str(tmp_path))
    loaded, _ = models.load(str(tmp_path), allow_pickle=True)
    assert models.n_layers(loaded) == models.n_layers(model)


def test_non_finite_logits_name_site_and_layer(tiny_model, world):
    model, tokenizer = tiny_model
    pairs = make_pairs(model, tokenizer, synthetic.facts(world), examples=4, seed=0, known_only=False)
    site = Site("subj", "Subj.", "resid", "subject")
    acts = extract(model, tokenizer, pairs, [site])
    values = acts["act_subj"].values.copy()
    values[:, 1] = np.inf  # as a float16 overflow would leave them
    acts["act_subj"] = (acts["act_subj"].dims, values)
    with pytest.raises(UserError, match=r"non-finite logits \(NaN or inf\) at site Subj\. \(resid@subject\), layer 1"):
        patch(model, tokenizer, pairs, acts, [site], engine="reference")
