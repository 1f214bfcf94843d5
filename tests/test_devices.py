"""Models placed by accelerate's device_map: blocks offloaded off the main device (to disk, on the CPU here)
give the same numbers as the plain model, with both engines; the config's device_map and max_memory are
checked by the schema."""

import numpy as np
import pytest
import torch
import transformers

from patch_runs import extract, patch_job

from patchmap import config as cfg
from patchmap import models, stages, synthetic
from patchmap.builtin import word_tokenizer
from patchmap.errors import UserError
from patchmap.engines.fast.blocks import FastEngine
from patchmap.sites import Site

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5
SITES = [Site("subj", "Subj.", "resid", "subject"), Site("attn", "Attn.", "attn", "last"),
         Site("last", "Last.", "resid", "last"), Site("mlp", "MLP", "mlp", "subject_last")]


def _ids(tok):
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


FAMILIES = {
    "llama": lambda t: transformers.LlamaConfig(
        vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, tie_word_embeddings=False,
        **_ids(t)),
    "gpt2": lambda t: transformers.GPT2Config(vocab_size=len(t), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                              initializer_range=0.3, **_ids(t)),
}
# Blocks 0 and 2 (and Llama's embeddings) offloaded to disk: accelerate's hooks sit on them and load their
# weights for each call. (accelerate wants every module named, not '' for the rest, when some go to disk.)
OFFLOADED = {
    "llama": {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "disk",
              "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"},
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "disk",
             "transformer.h.1": "cpu", "transformer.h.2": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"},
}


def _checkpoint(family, world, directory):
    torch.manual_seed(0)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    transformers.AutoModelForCausalLM.from_config(FAMILIES[family](tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _config(path, run=None, **model):
    config = {"models": {"m": {"path": path, **model}},
              "datasets": {"d": {"synthetic": {"seed": 0}}},
              "sites": {"s": {"component": "resid", "positions": "last"}},
              "runs": {"r": {"model": "m", "dataset": "d", "sites": ["s"], **(run or {})}}}
    return cfg.validate(config)


def _load_through_the_config(config, directory):
    """The run's model as a patch job loads it: from the identity record the model_identity stage makes."""
    identity = directory / "m.json"
    stages.model_identity("m", config["models"]["m"], config["models"]["m"]["path"], identity)
    return stages.load_run_model(config, "r", identity)


def _js(model, tokenizer, pairs, engine, **options):
    out = patch_job(model, tokenizer, pairs, extract(model, tokenizer, pairs, SITES), SITES, engine=engine, **options)
    return {name: ds["js"].values for name, ds in out.items()}


@pytest.fixture(scope="module")
def loaded(world, tmp_path_factory):
    """family -> (plain model, tokenizer, the same checkpoint loaded through the config with OFFLOADED)."""
    out = {}

    def load(family):
        if family not in out:
            path = _checkpoint(family, world, tmp_path_factory.mktemp(family))
            plain, tokenizer = models.load(path)
            spread, _ = _load_through_the_config(_config(path, {"device": "auto"}, device_map=OFFLOADED[family]),
                                                 tmp_path_factory.mktemp(f"{family}-identity"))
            out[family] = plain, tokenizer, spread
        return out[family]
    return load


@pytest.mark.parametrize("family, intervention", [("llama", "swap"), ("gpt2", "swap"), ("llama", "noise"),
                                                  ("llama", "knockout")])
def test_blocks_offloaded_by_accelerate_give_the_plain_models_numbers(family, intervention, loaded, pairs_for):
    plain, tokenizer, spread = loaded(family)
    blocks = models.blocks(spread)
    for layer in (0, 2):
        assert hasattr(blocks[layer], "_hf_hook"), "accelerate's hook is not on the offloaded block"
        assert {p.device.type for p in blocks[layer].parameters()} == {"meta"}, "block weights not offloaded"
    pairs = pairs_for(plain, tokenizer, examples=8, seed=1, intervention=intervention)
    expected = _js(plain, tokenizer, pairs, "reference")
    fast = FastEngine(spread)
    for engine in ("reference", "fast", fast):
        got = _js(spread, tokenizer, pairs, engine)
        for name, js in expected.items():
            assert np.abs(got[name] - js).max() <= TOLERANCE, (engine, name)
    # the model's own logits once, at one position of the first clean run (the engine's head checked there)
    assert fast.stats["clean_logit_rows"] == 1
    assert max(js.max() for js in expected.values()) > 0.1  # the comparison is not between zeros


def test_a_strategy_with_max_memory_offloads_what_does_not_fit(loaded, world, tmp_path, pairs_for):
    """device_map: sequential with max_memory {cpu: half the model}: accelerate puts the rest on disk."""
    plain, tokenizer, _ = loaded("llama")
    half = sum(p.numel() * p.element_size() for p in plain.parameters()) // 2
    path = _checkpoint("llama", world, tmp_path / "llama")
    config = _config(path, {"device": "auto"}, device_map="sequential", max_memory={"cpu": half})
    spread, _ = _load_through_the_config(config, tmp_path)
    assert "disk" in spread.hf_device_map.values() and "cpu" in spread.hf_device_map.values()
    pairs = pairs_for(plain, tokenizer, examples=8, seed=1)
    expected, got = _js(plain, tokenizer, pairs, "reference"), _js(spread, tokenizer, pairs, "fast")
    for name, js in expected.items():
        assert np.abs(got[name] - js).max() <= TOLERANCE, name


def test_cpu_and_auto_without_a_gpu_load_onto_the_cpu(loaded, tmp_path, world):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: device auto spreads over it")
    path = _checkpoint("gpt2", world, tmp_path / "gpt2")
    for device in ("cpu", "auto"):
        model, _ = _load_through_the_config(_config(path, {"device": device}), tmp_path)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert not hasattr(model, "hf_device_map") or set(model.hf_device_map.values()) == {"cpu"}
        assert models.input_device(model) == models.output_device(model) == torch.device("cpu")


def test_placement_from_the_config(caplog):
    assert models.placement("cpu") == ({"": torch.device("cpu")}, None)
    assert models.placement("cpu", "balanced", {"cpu": "1GB"}) == ({"": torch.device("cpu")}, None)
    assert "apply with device: auto only" in caplog.text
    device_map, max_memory = models.placement("auto", "balanced", {"0": "70GiB", "cuda:1": 1000, "cpu": "2GB"})
    assert (device_map, max_memory) == ("balanced", {0: "70GiB", 1: 1000, "cpu": "2GB"})
    assert models.placement("auto", {"model.layers.0": "cpu", "lm_head": "disk"})[0] == \
        {"model.layers.0": "cpu", "lm_head": "disk"}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device_map places modules on GPU 1, but this job sees 0"):
            models.placement("auto", {"model.layers.0": "cuda:1"})
        with pytest.raises(UserError, match="no CUDA GPU"):
            models.placement("cuda")


@pytest.mark.parametrize("model, where", [
    ({"device_map": "fastest"}, "models.m.device_map"),
    ({"device_map": {}}, "models.m.device_map"),
    ({"device_map": {"model.layers.0": "gpu"}}, "models.m.device_map.model.layers.0"),
    ({"device_map": {"model.layers.0": -1}}, "models.m.device_map.model.layers.0"),
    ({"max_memory": {"cpu": "lots"}}, "models.m.max_memory.cpu"),
    ({"max_memory": {"cpu": "2TB"}}, "models.m.max_memory.cpu"),
    ({"max_memory": {"gpu0": "10GiB"}}, "models.m.max_memory"),
    ({"max_memory": {-1: "10GiB"}}, "models.m.max_memory"),
])
def test_bad_device_map_or_max_memory_is_a_config_error(model, where):
    with pytest.raises(UserError, match=f"^config error at {where}: "):
        _config("some/model", **model)


def test_good_device_map_and_max_memory_pass_the_schema():
    config = _config("some/model", device_map={"model.embed_tokens": 0, "model.layers.0": "cuda:1",
                                               "model.layers.1": "cuda", "lm_head": "disk", "model.norm": "cpu"},
                     max_memory={0: "70GiB", "1": "1.5GB", "cuda:2": 1000, "cpu": "500MB", "disk": "10GiB"})
    assert config["models"]["m"]["device_map"]["lm_head"] == "disk"
    assert _config("some/model", device_map="balanced_low_0")["models"]["m"]["device_map"] == "balanced_low_0"
