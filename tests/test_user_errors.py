"""Every mistake a user can make ends in one `patchmap:` line, never a traceback: one test per class, each
with several inputs of its kind: config keys and values, dataset files and facts, model folders and hub
ids, the Python API's arguments, and faults (a killed snakemake, a full disk, an unexpected exception in a
job)."""

import contextlib
import copy
import dataclasses
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from patch_runs import extract, patch_job
from transformers import GPT2Config, GPT2LMHeadModel
from workflow_utils import REPO, snakemake, snakemake_command, write_config

from patchmap import config as cfg
from patchmap import layouts, models, runtime, storage, synthetic
from patchmap.api import patch_heatmap
from patchmap.encoding import encode_facts
from patchmap.errors import UserError
from patchmap.facts import download, load_jsonl, read_facts, write_jsonl
from patchmap.sites import Site

# ---------------------------------------------------------------------------------------------------
# Config keys and values, dataset rows, models: one line each, from the function that checks them

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
        "config error at sites.subj.component: 'residual' is not one of ['resid', 'attn', 'mlp', 'head']")
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
def test_nothing_left_after_filtering(tiny_model, world, pairs_for):
    facts = synthetic.facts(world)
    with pytest.raises(UserError, match="no pairs left after filtering and pairing"):
        pairs_for(*tiny_model, examples=5, known_only=True)  # a random model knows nothing
    with pytest.raises(UserError, match="'dropped_no_partner': 1"):
        pairs_for(*tiny_model, examples=5, facts=[facts[0]])


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


def test_non_finite_logits_name_site_and_layer(tiny_model, pairs_for):
    model, tokenizer = tiny_model
    pairs = pairs_for(model, tokenizer, examples=4)
    site = Site("subj", "Subj.", "resid", "subject")
    acts = extract(model, tokenizer, pairs, [site])
    values = acts["act_subj"].values.copy()
    values[:, 1] = np.inf  # as a float16 overflow would leave them
    acts["act_subj"] = (acts["act_subj"].dims, values)
    with pytest.raises(UserError, match=r"non-finite logits \(NaN or inf\) at site Subj\. \(resid@subject\), layer 1"):
        patch_job(model, tokenizer, pairs, acts, [site], engine="reference")


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_non_finite_logits_of_the_unpatched_target_are_named(tiny_model, pairs_for, engine):
    model, tokenizer = tiny_model
    pairs = pairs_for(model, tokenizer, examples=4)
    site = Site("last", "Last.", "resid", "last")
    acts = extract(model, tokenizer, pairs, [site])
    weight = model.get_output_embeddings().weight
    kept = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[3] = np.inf  # every run's logit of token 3: inf or NaN
        with pytest.raises(UserError, match=r"non-finite logits \(NaN or inf\) in the unpatched target run"):
            patch_job(model, tokenizer, pairs, acts, [site], engine=engine)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


GOOD_FACT = {"subject": "Abel Bran", "prompt": "Abel Bran lives in the city of", "attribute": "Paris"}

# A config whose runs need no model to be trained: errors at config time or in the facts job.
PATH_RUN = {
    "models": {"m": {"path": "some-org/some-model"}},
    "datasets": {"d": {"path": "facts.jsonl"}},
    "sites": {"last": {"label": "Last.", "component": "resid", "positions": "last"}},
    "runs": {"r": {"model": "m", "dataset": "d", "sites": ["last"], "examples": 4}},
}


def one_line(error):
    message = str(error.value) if hasattr(error, "value") else str(error)
    assert "\n" not in message and message
    return message


def patchmap_lines(text):
    """Every `patchmap:` line (a job writes it to its log only, which Snakemake shows once)."""
    return [line[line.index("patchmap:"):] for line in text.splitlines() if "patchmap:" in line]


def assert_one_clear_line(result, expected):
    output = result.stdout + result.stderr
    assert result.returncode != 0
    lines = patchmap_lines(output)
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert "Traceback" not in output


def trusted_results(workdir):
    """Files under results/ that a rerun would take as finished (no logs, benchmarks or temporary files)."""
    results = workdir / "results"
    return sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()
                  and not {"logs", "benchmarks"} & set(p.relative_to(results).parts) and not p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------------
# 1. The Python API checks its arguments with the workflow's schema and the dataset files' fact checks

def test_api_takes_the_readme_facts(tiny_model, world):
    model, tokenizer = tiny_model
    facts = [{"subject": f["subject"], "prompt": f["prompt"], "attribute": f["attribute"]}
             for f in synthetic.facts(world)]  # the README's form: no relation, no id
    ds = patch_heatmap(model, tokenizer, facts, examples=4, known_only=False, progress=False,
                       layers=np.arange(2), seed=np.int64(1))
    assert ds.sizes["example"] == 4 and list(ds["layer"].values) == [0, 1]


@pytest.mark.parametrize("arguments, expected", [
    ({"examples": 0}, "argument examples: 0 is less than the minimum of 1"),
    ({"examples": 2.5}, "argument examples: 2.5 is not of type 'integer'"),
    ({"batch_size": 0}, "argument batch_size: 0 is less than the minimum of 1"),
    ({"window": 0}, "argument window: 0 is less than the minimum of 1"),
    ({"js_base": 3}, "argument js_base: 3 is not one of [2, 'e']"),
    ({"noise_scale": -1}, "argument noise_scale: -1 is less than or equal to the minimum of 0"),
    ({"intervention": "noise", "noise_samples": 0}, "argument noise_samples: 0 is less than the minimum of 1"),
    ({"seed": -1}, "argument seed: -1 is less than the minimum of 0"),
    ({"intervention": "swop"}, "argument intervention: 'swop' is not one of"),
    ({"engine": "turbo"}, "argument engine: 'turbo' is not one of ['fast', 'reference']"),
    ({"known_only": "yes"}, "argument known_only: 'yes' is not of type 'boolean'"),
    ({"layers": [0, 0]}, "argument layers: layer 0 is listed twice"),
    ({"layers": "some"}, "argument layers: 'some' is not allowed"),
    ({"layers": []}, "argument layers: [] should be non-empty"),
    ({"layers": [-1]}, "argument layers.0: -1 is less than the minimum of 0"),
    ({"layers": [7]}, "argument layers: layer 7 is out of range; the model has layers 0 to 2"),
    ({"sites": {}}, "argument sites: {} should be non-empty"),
    ({"sites": {"x": {"component": "residual", "positions": "last"}}},
     "argument sites.x.component: 'residual' is not one of ['resid', 'attn', 'mlp', 'head']"),
    ({"sites": {"x": {"component": "resid"}}}, "argument sites.x: 'positions' is a required property"),
    ({"sites": {"a": {"component": "resid", "positions": "last", "label": "L"},
                "b": {"component": "attn", "positions": "last", "label": "L"}}},
     "argument sites.b: label 'L' is already used by site 'a'"),
    ({"intervention": "knockout", "sites": {"a": {"component": "resid", "positions": "all"}}},
     "argument sites: knockout at site 'a' (positions 'all')"),
    ({"intervention": "knockout", "sites": {"a": {"component": "head", "positions": "subject"}}},
     "argument sites: knockout at site 'a' (component head) would block one head's edges"),
    ({"facts": []}, "argument facts: there are no facts"),
    ({"facts": {"subject": "A"}}, "argument facts: expected a list of facts, found an object"),
    ({"facts": [{**GOOD_FACT, "id": 1}, {**GOOD_FACT, "id": "1"}]},
     "argument facts: fact id '1' is used twice (record 0 and record 1)"),
    ({"facts": [{**GOOD_FACT, "id": "a"}, {**GOOD_FACT, "id": "a"}]}, "fact id 'a' is used twice"),
    ({"facts": [{**GOOD_FACT, "attribute": 5}]}, "record 0: field 'attribute' must be a string, not a number"),
    ({"facts": [{"subject": "A", "prompt": "A is"}]}, "record 0: field 'attribute' is missing or empty"),
    ({"facts": ["A is in Paris"]}, "record 0: expected an object with subject, prompt, attribute, found str"),
    ({"model": "gpt2"}, "argument model: expected a loaded model (e.g. from models.load), not str"),
    ({"tokenizer": None}, "argument tokenizer: expected a loaded tokenizer (e.g. from models.load), not NoneType"),
])
def test_api_arguments_are_checked_like_a_run(tiny_model, world, arguments, expected):
    model, tokenizer = tiny_model
    arguments = {"examples": 4, "known_only": False, "progress": False, **arguments}
    facts = arguments.pop("facts", synthetic.facts(world))
    model, tokenizer = arguments.pop("model", model), arguments.pop("tokenizer", tokenizer)
    with pytest.raises(UserError) as error:
        patch_heatmap(model, tokenizer, facts, **arguments)
    assert expected in one_line(error)


def test_a_head_site_on_a_family_without_a_known_output_projection(tiny_model, world, monkeypatch):
    model, tokenizer = tiny_model
    monkeypatch.setitem(layouts.LAYOUTS, "llama", dataclasses.replace(layouts.LAYOUTS["llama"], out_proj=None))
    with pytest.raises(UserError) as error:
        patch_heatmap(model, tokenizer, synthetic.facts(world), sites={"h": {"component": "head", "positions": "last"}},
                      examples=2, known_only=False, progress=False)
    assert "component 'head' needs the attention's output projection of 'llama' models, which patchmap's family " \
           "table (patchmap/layouts.py) does not name; use component attn" in one_line(error)


# ---------------------------------------------------------------------------------------------------
# 2. Model folders and hub ids: each fault names the folder (or id) and what is wrong

def _break_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


def _drop(*patterns):
    def drop(folder):
        for pattern in patterns:
            for path in folder.glob(pattern):
                path.unlink()
    return drop


def _empty(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def _index_without_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


def _widen_config(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))


def _drop_a_tensor(folder):
    from safetensors.torch import load_file, save_file
    weights = load_file(folder / "model.safetensors")
    del weights[sorted(weights)[1]]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("breakage, expected", [
    (_empty, "is empty"),
    (_drop_a_tensor, "weights are missing from its weight files (1, first: "),
    (_widen_config, "the weights' shapes do not fit its config.json"),
    (_break_config, "config.json is not valid JSON (line 1"),
    (_drop("config.json"), "has no config.json"),
    (lambda f: (f / "tokenizer.json").write_text("{"), "tokenizer.json is not valid JSON"),
    (_truncate_weights, "model.safetensors is damaged or incomplete"),
    (_drop("*.safetensors"), "has no weight files"),
    (_index_without_shard, "lists weight file 'model-00002-of-00002.safetensors', which is missing"),
    (_drop("tokenizer*", "special_tokens_map.json"), "has no tokenizer files"),
    (lambda f: (f / "config.json").write_text('{"hidden_size": 4}'), "config.json names no model_type"),
    (lambda f: (f / "config.json").write_text('["llama"]'), "config.json holds a JSON list, not an object"),
])
def test_broken_model_folder_is_named(tmp_path, tiny_model_dir, breakage, expected):
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, folder)
    breakage(folder)
    with pytest.raises(UserError) as error:
        models.load(str(folder))
    message = one_line(error)
    assert str(folder) in message and expected in message
    assert "allow_pickle" not in message


def test_model_paths_offline_and_with_typos_fail_at_once(tmp_path, tiny_model_dir, monkeypatch):
    """No network is touched: a typo in a local path, a file given for the folder, and a hub id that is
    not cached while the hub is offline or unreachable each fail with one line, at once."""
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (test)")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "checkpoints" / "tiny")
    (tmp_path / "home").mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "home" / "my-model")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    models.load("~/my-model")  # ~ is expanded
    models.load("checkpoints/tiny")
    cases = [("checkpoints/tinny", "model path 'checkpoints/tinny' does not exist"),
             ("./tiny", "model path './tiny' does not exist"),
             ("~/my-modle", f"model path '{tmp_path}/home/my-modle' does not exist"),
             ("checkpoints/tiny/config.json", "is a file; give the folder"),
             ("a/b/c", "model path 'a/b/c' does not exist")]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases.append(("some-org/some-model", "as a Hugging Face hub id it is not in the local cache"))
    for source, expected in cases:
        with pytest.raises(UserError) as error:
            models.load(source)
        assert expected in one_line(error), source
    assert "the hub is offline (HF_HUB_OFFLINE=1)" in one_line(error)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError) as error:
        models.load("some-org/some-model")
    assert "cannot be reached: network is unreachable (test)" in one_line(error)


def test_broken_model_folder_in_the_workflow(tmp_path):
    config = copy.deepcopy(PATH_RUN)
    config["models"]["m"]["path"] = "empty-model"
    (tmp_path / "empty-model").mkdir()
    (tmp_path / "facts.jsonl").write_text(json.dumps(GOOD_FACT) + "\n")
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "results/r/pairs.nc")
    assert_one_clear_line(result, "patchmap: model folder 'empty-model' is empty")
    assert "model folder 'empty-model' is empty" in (tmp_path / "results/models/logs/m.identity.log").read_text()
    assert trusted_results(tmp_path) == ["datasets/d/facts.jsonl"]


def test_a_trace_naming_a_fact_not_in_its_dataset_in_the_workflow(tmp_path, tiny_model_dir):
    config = copy.deepcopy(PATH_RUN)
    config["models"]["m"]["path"] = str(tiny_model_dir)
    config["traces"] = {"t": {"model": "m", "dataset": "d", "facts": ["0", "nope"]}}
    (tmp_path / "facts.jsonl").write_text(json.dumps(GOOD_FACT) + "\n")
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "results/traces/t/trace.nc")
    assert_one_clear_line(result, "patchmap: trace 't': fact id 'nope' is not in the dataset (1 facts; ids like 0)")
    assert "loaded model" not in (tmp_path / "results/traces/t/logs/trace.log").read_text()  # refused before
    assert not (tmp_path / "results/traces/t/trace.nc").exists()


# ---------------------------------------------------------------------------------------------------
# 4. Dataset files

FACT_LINE = json.dumps(GOOD_FACT).encode()


@pytest.mark.parametrize("name, content, expected", [
    ("latin1.jsonl", FACT_LINE + b"\n" + '{"subject": "M\u00fcller"}'.encode("latin-1"),
     "not UTF-8 text: byte 0xfc at line 2, byte 15 of the line"),
    ("utf16.json", json.dumps([GOOD_FACT]).encode("utf-16"), "not UTF-8 text: byte 0xff at line 1"),
    ("object.json", json.dumps({"facts": [GOOD_FACT]}, indent=2).encode(),
     "the file holds an object (keys: facts); expected a JSON list of facts"),
    ("object1.json", json.dumps({"facts": [GOOD_FACT]}).encode(), "line 1: expected an object with subject, "
     "prompt, attribute, found an object with keys: facts"),
    ("number.jsonl", json.dumps({**GOOD_FACT, "attribute": 42}).encode(),
     "line 1: field 'attribute' must be a string, not a number"),
    ("null.json", json.dumps([{**GOOD_FACT, "subject": None}]).encode(),
     "record 0: field 'subject' must be a string, not null"),
    ("list.json", json.dumps([GOOD_FACT, [1, 2]]).encode(), "record 1: expected an object with"),
    ("relation.jsonl", json.dumps({**GOOD_FACT, "relation": ["P17"]}).encode(),
     "field 'relation' must be a string or an integer, not a list"),
    ("empty.jsonl", b"\n\n", "there are no facts"),
    ("empty.json", b"[]", "there are no facts"),
    ("ids.jsonl", FACT_LINE[:-1] + b', "id": 7}\n' + FACT_LINE[:-1] + b', "id": "7"}\n',
     "fact id '7' is used twice (line 1 and line 2)"),
])
def test_bad_dataset_file_is_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        read_facts(path)
    assert one_line(error).startswith(str(path)) and expected in one_line(error)


def test_dataset_byte_order_mark_is_read_and_a_folder_refused(tmp_path):
    for name, text in (("bom.jsonl", json.dumps(GOOD_FACT)), ("bom.json", json.dumps([GOOD_FACT]))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert read_facts(tmp_path / name)[0]["subject"] == "Abel Bran"
    with pytest.raises(UserError, match="dataset path '.*' is a folder"):
        read_facts(tmp_path)


def test_sha256_mismatch_names_the_url_and_the_dataset(tmp_path):
    source = tmp_path / "known.json"
    source.write_text(json.dumps([GOOD_FACT]))
    out = tmp_path / "results" / "datasets" / "known.json"
    with pytest.raises(UserError) as error:
        download(source.as_uri(), out, "0" * 64, f"dataset 'known' ({source.as_uri()})")
    assert one_line(error).startswith(f"dataset 'known' ({source.as_uri()}): sha256 is ")
    assert ".tmp" not in one_line(error)
    assert not out.exists() and not list(out.parent.iterdir())


@pytest.mark.parametrize("dataset, setup, expected", [
    ({"path": "missing.jsonl"}, None, "patchmap: dataset file 'missing.jsonl' does not exist (datasets.d.path)"),
    ({"path": "data"}, lambda w: (w / "data").mkdir(), "patchmap: dataset path 'data' is a folder"),
])
def test_dataset_path_is_checked_when_the_workflow_starts(tmp_path, dataset, setup, expected):
    config = copy.deepcopy(PATH_RUN)
    config["datasets"]["d"] = dataset
    if setup:
        setup(tmp_path)
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--dry-run")
    assert_one_clear_line(result, expected)
    assert "MissingInputException" not in result.stdout + result.stderr


@pytest.mark.parametrize("dataset, content, expected", [
    ({"path": "facts.jsonl"}, b"\xff\xfe" + FACT_LINE, "facts.jsonl: not UTF-8 text: byte 0xff at line 1"),
    ({"url": "FILE_URL", "sha256": "0" * 64}, FACT_LINE, "dataset 'd' (file://"),
])
def test_bad_dataset_in_the_workflow(tmp_path, dataset, content, expected):
    (tmp_path / "facts.jsonl").write_bytes(content)
    config = copy.deepcopy(PATH_RUN)
    config["datasets"]["d"] = {k: (tmp_path / "facts.jsonl").as_uri() if v == "FILE_URL" else v
                               for k, v in dataset.items()}
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "results/datasets/d/facts.jsonl")
    assert_one_clear_line(result, expected)
    logs = "".join(p.read_text() for p in (tmp_path / "results").rglob("logs/*.log"))
    assert expected in logs
    assert trusted_results(tmp_path) == []


def test_prompts_longer_than_the_positions_are_dropped_and_counted(tiny_model, world, pairs_for):
    _, tokenizer = tiny_model
    rows = synthetic.facts(world)
    lengths = [len(tokenizer(f["prompt"])["input_ids"]) for f in rows]
    limit = sorted(lengths)[len(lengths) // 2]
    assert min(lengths) <= limit < max(lengths)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=limit, n_embd=16, n_layer=1,
                                      n_head=2)).eval()
    pairs = pairs_for(gpt2, tokenizer, examples=4)
    assert pairs.attrs["count_dropped_too_long"] == sum(n > limit for n in lengths) > 0
    assert int(pairs["length"].max()) <= limit


# ---------------------------------------------------------------------------------------------------
# 5. Config corners

@pytest.mark.parametrize("text, expected", [
    ("runs:\n  r: {seed: 1}\n  r: {seed: 2}\n", "line 3: key 'r' is defined twice"),
    ("models: {}\nmodels: {}\n", "line 2: key 'models' is defined twice"),
    ("sites:\n  s:\n    component: resid\n    component: attn\n", "line 4: key 'component' is defined twice"),
    ("runs: [\n", "not valid YAML at line 2"),
])
def test_yaml_keys_given_twice_are_refused(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        cfg.load_yaml(path)
    assert one_line(error).startswith(str(path)) and expected in one_line(error)


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nruns:\n  a:\n    <<: *b\n    y: 3\n  c: *b\n")
    assert cfg.load_yaml(path) == {"base": {"x": 1, "y": 2}, "runs": {"a": {"x": 1, "y": 3}, "c": {"x": 1, "y": 2}}}


def _run_change(**changes):
    def change(config):
        config["runs"]["r"].update(changes)
    return change


def _rename_run(name):
    def change(config):
        config["runs"][name] = config["runs"].pop("r")
    return change


def _trace(**settings):
    def change(config):
        config["traces"] = {"t": {"model": "m", "dataset": "d", "facts": ["f1"], **settings}}
    return change


@pytest.mark.parametrize("change, expected", [
    (_run_change(seed=-1), "config error at runs.r.seed: -1 is less than the minimum of 0"),
    (_run_change(layers=[0, 0]), "config error at runs.r.layers: layer 0 is listed twice"),
    (_run_change(layers=[1, 2, 1]), "config error at runs.r.layers: layer 1 is listed twice"),
    (_run_change(sites=["last", "last"]), "config error at runs.r.sites: site 'last' is listed twice"),
    (lambda c: c["datasets"]["d"].update(path=None) or c["datasets"].update(d={"synthetic": {"seed": -3}}),
     "config error at datasets.d.synthetic.seed: -3 is less than the minimum of 0"),
    (_rename_run("models"), "config error at runs.models: the run name 'models' is taken by results/models"),
    (_rename_run("datasets"), "config error at runs.datasets: the run name 'datasets' is taken"),
    (_rename_run("figures"), "config error at runs.figures: the run name 'figures' is taken"),
    (_rename_run("Figures"), "config error at runs.Figures: the run name 'Figures' is taken"),
    (_rename_run("README.md"), "config error at runs.README.md: the run name 'README.md' is taken"),
    (lambda c: c["models"].update(logs={"builtin": {"dataset": "d"}}) or c["datasets"].update(d={"synthetic": {}}),
     "config error at models.logs: the model name 'logs' is taken by results/models/logs"),
    (_rename_run("traces"), "config error at runs.traces: the run name 'traces' is taken by results/traces"),
    (lambda c: c["sites"].update(h={"component": "head", "positions": "last"}) or c["runs"]["r"].update(sites=["h"])
     or c.update(figures={"f": {"runs": ["r"]}}), "config error at figures.f.runs: run 'r' has head sites only"),
    (_trace(window={"mlp": 0}), "config error at traces.t.window.mlp: 0 is less than the minimum of 1"),
    (_trace(window={"resid": 0}), "config error at traces.t.window.resid: 0 is less than the minimum of 1"),
    (_trace(facts=[{"subject": "Zed", "prompt": "Abel Bran lives in", "attribute": "Rome"}]),
     "config error at traces.t.facts.0: subject 'Zed' does not occur in the prompt 'Abel Bran lives in'"),
    (_trace(intervention="swap", facts=["f1", {"id": "f2", "source": {"subject": "Zed", "prompt": "Abel is",
                                                                        "attribute": "x"}}]),
     "config error at traces.t.facts.0: a swap trace patches each fact with its `source`"),
    (_trace(facts=[{"id": "f2", "source": "f1"}]), "config error at traces.t.facts.0: `source` is for swap traces"),
    (_trace(dataset="nope"), "config error at traces.t.dataset: 'nope' is not defined; defined datasets: d"),
    (_trace(components=["resid", "head"]), "config error at traces.t.components.1: 'head' is not one of"),
    (lambda c: _trace()(c) or c["traces"]["t"].pop("dataset"),
     "config error at traces.t.facts.0: fact id 'f1' needs the trace's `dataset`"),
])
def test_config_corners(change, expected):
    config = copy.deepcopy(PATH_RUN)
    change(config)
    with pytest.raises(UserError) as error:
        cfg.validate(config)
    assert one_line(error).startswith(expected)


@pytest.mark.parametrize("how", ["default", "configfile"])
def test_workflow_refuses_duplicate_keys_and_shared_folder_names(tmp_path, how):
    text = yaml.safe_dump(PATH_RUN, sort_keys=False, default_flow_style=None)
    text = text.replace("runs:\n", "runs:\n  r: {model: m, dataset: d, sites: [last], seed: 5}\n")
    (tmp_path / "facts.jsonl").write_text(json.dumps(GOOD_FACT) + "\n")
    if how == "default":
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "config.yaml").write_text(text)
        result = snakemake(tmp_path, "--dry-run")
        assert_one_clear_line(result, "patchmap: config/config.yaml: line ")
    else:
        (tmp_path / "mine.yaml").write_text(text)
        result = snakemake(tmp_path, "--dry-run", "--configfile", str(tmp_path / "mine.yaml"))
        assert_one_clear_line(result, "mine.yaml: line ")
    assert "key 'r' is defined twice" in result.stderr
    if how == "default":  # a YAML syntax error in the default config file: one line with its line number
        (tmp_path / "config" / "config.yaml").write_text(text.replace("runs:\n", "runs:\n  bad: [\n", 1))
        assert_one_clear_line(snakemake(tmp_path, "--dry-run"), "patchmap: config/config.yaml: not valid YAML at line")
    shared = copy.deepcopy(PATH_RUN)
    shared["runs"]["figures"] = shared["runs"].pop("r")
    write_config(tmp_path, shared)
    assert_one_clear_line(snakemake(tmp_path, "--dry-run"), "the run name 'figures' is taken")
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------------------
# 6. Faults: a full disk, an unexpected exception in a job, a killed snakemake

def test_a_full_disk_is_named(tmp_path, monkeypatch):
    ds = xr.Dataset({"x": (("a",), np.zeros(10))})
    out = tmp_path / "results" / "r" / "pairs.nc"

    def hidden_full_disk(self, *args, **kwargs):  # what netCDF says when the disk fills up
        raise RuntimeError("NetCDF: HDF error")
    monkeypatch.setattr(xr.Dataset, "to_netcdf", hidden_full_disk)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=4096))
    with pytest.raises(UserError) as error:
        storage.write_netcdf(ds, out)
    assert one_line(error).startswith(f"the disk is full: no space left to write {out}")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(shutil, "disk_usage", real_usage)  # plenty of space: only the errno tells
    monkeypatch.setattr(json, "dumps", no_space)
    with pytest.raises(UserError, match="the disk is full: no space left to write .*facts.jsonl"):
        write_jsonl([GOOD_FACT], tmp_path / "results" / "r" / "facts.jsonl")
    with pytest.raises(UserError, match="the disk is full"):
        with storage.atomic_directory(tmp_path / "results" / "models" / "m"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(RuntimeError, match="NetCDF: HDF error"):  # not a full disk: not called one
        storage.write_netcdf(ds, out)
    assert not [p for p in (tmp_path / "results").rglob("*") if p.is_file()]


def _mount_tmpfs(folder, size):
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    folder.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_is_named(tmp_path):
    """On a real, tiny file system (a 64 KiB tmpfs: needs root; elsewhere test_a_full_disk_is_named
    stands in for it), writing a netCDF file and a JSON Lines file fails with the full disk named."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(UserError, match="the disk is full: no space left to write"):
            storage.write_netcdf(xr.Dataset({"x": (("a",), np.zeros(100_000))}), disk / "r" / "pairs.nc")
        with pytest.raises(UserError, match="the disk is full: no space left to write"):
            write_jsonl([GOOD_FACT] * 2000, disk / "r" / "facts.jsonl")
        assert not [p for p in disk.rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_unexpected_error_goes_into_the_log(tmp_path, capsys):
    log_path = tmp_path / "logs" / "facts.log"
    with pytest.raises(SystemExit) as exit_status:
        with runtime.reported_errors(log_path):
            {}["missing"]
    assert exit_status.value.code == 1
    log_text = log_path.read_text()
    assert "Traceback (most recent call last)" in log_text and "KeyError: 'missing'" in log_text
    terminal = capsys.readouterr().err
    assert "Traceback" not in terminal
    assert f"the job failed with an unexpected error, KeyError: 'missing'; the traceback is in {log_path}" in terminal
    with pytest.raises(SystemExit):
        with runtime.reported_errors(log_path):
            raise UserError("a clear line")
    assert log_path.read_text().count("patchmap: a clear line") == 1


def test_unexpected_error_in_a_job_is_in_its_log(tmp_path):
    """A bug in a job (here: read_facts replaced by one that raises, through sitecustomize in the job's
    Python) leaves the traceback in results/{run}/logs/, and nothing a rerun would trust."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import patchmap.facts\n"
        "def read_facts(path):\n"
        "    raise ZeroDivisionError('a bug in read_facts')\n"
        "patchmap.facts.read_facts = read_facts\n")
    (tmp_path / "facts.jsonl").write_text(json.dumps(GOOD_FACT) + "\n")
    write_config(tmp_path, PATH_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(snakemake_command(tmp_path, "results/datasets/d/facts.jsonl"), capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode != 0
    log_text = (tmp_path / "results" / "datasets" / "logs" / "d.facts.log").read_text()
    assert "Traceback (most recent call last)" in log_text and "ZeroDivisionError: a bug in read_facts" in log_text
    assert "the traceback is in results/datasets/logs/d.facts.log" in result.stderr
    assert trusted_results(tmp_path) == []


def test_after_kill_9_the_rerun_says_unlock_and_then_runs(tmp_path):
    """Snakemake's lock outlives a kill -9 (it holds no process id to check): the rerun is refused with
    the advice to unlock, as README's Resuming section says; after --unlock the workflow runs on."""
    config = copy.deepcopy(PATH_RUN)
    os.mkfifo(tmp_path / "facts.fifo")  # the facts job blocks reading it: snakemake is caught mid-run
    config["datasets"]["d"]["path"] = "facts.fifo"
    write_config(tmp_path, config)
    run = subprocess.Popen(snakemake_command(tmp_path, "results/datasets/d/facts.jsonl"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "results" / "datasets" / "logs" / "d.facts.log").exists():
            assert time.time() < deadline and run.poll() is None, "the facts job never started"
            time.sleep(0.1)
        assert list((tmp_path / ".snakemake" / "locks").iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # snakemake and its job
        run.wait()
    (tmp_path / "facts.fifo").unlink()
    (tmp_path / "facts.fifo").write_text(json.dumps(GOOD_FACT) + "\n")
    again = snakemake(tmp_path, "results/datasets/d/facts.jsonl")
    assert again.returncode != 0 and "--unlock" in again.stderr
    assert snakemake(tmp_path, "--unlock").returncode == 0
    resumed = snakemake(tmp_path, "results/datasets/d/facts.jsonl")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_jsonl(tmp_path / "results" / "datasets" / "d" / "facts.jsonl")[0]["subject"] == "Abel Bran"
