"""The fast engine against the reference engine, on tiny random-weight models of every supported family
(saved with save_pretrained and loaded through patchmap.models.load, the real from_pretrained path)."""

import logging

import numpy as np
import pytest
import torch

from families import FAMILIES, build_model
from patch_runs import ALL_SITES, HEAD_SITES, engines_agree, extract, patch_job, run_intervention

from patchmap import models, synthetic
from patchmap.builtin import word_tokenizer
from patchmap.engines.fast.blocks import FastEngine
from patchmap.engines.fast import driver
from patchmap.engines.fast.driver import run_fast
from patchmap.engines.memory import is_out_of_memory
from patchmap.engines import flops
from patchmap.engines import reference as reference_engine
from patchmap.errors import UserError
from patchmap.job import PatchJob
from patchmap.sites import COMPONENTS, Site
from tolerances import assert_datasets_close

pytestmark = pytest.mark.usefixtures("one_thread")
INIT = 0.3  # large random weights: sharp, very different next-token distributions, so differences show


def _save_and_load(name, world, directory):
    torch.manual_seed(0)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    model = build_model(name, len(tokenizer), layers=3, init=INIT, **ids)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model, tokenizer = models.load(str(directory))
    assert model.config.model_type == name
    return model, tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def each_family(request, tmp_path_factory, world):
    return _save_and_load(request.param, world, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def load_family(tmp_path_factory, world):
    loaded = {}

    def load(name):
        if name not in loaded:
            loaded[name] = _save_and_load(name, world, tmp_path_factory.mktemp(name))
        return loaded[name]
    return load


def test_fast_equals_reference_for_every_site(each_family, pairs_for):
    """Every component and position group, and every head of head sites (their query heads, for the
    families whose tiny models have fewer key/value heads)."""
    model, tokenizer = each_family
    pairs = pairs_for(model, tokenizer, examples=10, seed=1)
    assert len(set(pairs["length"].values.tolist())) > 1, "the test needs prompts of different lengths"
    sites = ALL_SITES + HEAD_SITES
    reference, _, engine = engines_agree(model, tokenizer, pairs, extract(model, tokenizer, pairs, sites, batch_size=5),
                                         sites, batch_size=5)
    # the clean run recorded every layer's keys and values (else every run recomputes its whole prompt:
    # the same numbers, several times the work), and the subject's runs went through the span path
    assert "prefix" not in engine.warned and engine.stats["span_runs"] > 0
    # the comparison means something: patching moves the distribution a lot somewhere, a single head too
    assert max(float(ds["js"].max()) for ds in reference.values()) > 0.05
    assert max(float(reference[s.name]["js"].max()) for s in HEAD_SITES) > 0.01
    heads = reference[HEAD_SITES[0].name]
    assert heads["js"].dims == ("example", "layer", "head")
    assert list(heads["head"].values) == list(range(models.head_shape(model)[0]))


@pytest.mark.parametrize("positions", ["subject", "last"])
def test_all_heads_at_once_equal_the_attention_output(each_family, pairs_for, positions):
    """A head site written at every head together (no `head` chosen) writes the output projection's whole
    input: its output is then the source's attention output, so the numbers are the attn site's."""
    model, tokenizer = each_family
    pairs = pairs_for(model, tokenizer, examples=6, seed=1)
    heads, attn = Site("heads", "Heads", "head", positions), Site("attn", "Attn", "attn", positions)
    job = PatchJob(model=model, pairs=pairs, sites=[heads, attn], layers=list(range(models.n_layers(model))),
                   batch_size=3, pad_id=tokenizer.pad_token_id, intervention=run_intervention("swap"),
                   sources=extract(model, tokenizer, pairs, [heads, attn]), progress=False)
    for engine in (reference_engine.run_reference, run_fast):
        result = engine(job)
        assert float(result["attn"]["js"].max()) > 0.01  # far above the tolerance (1e-5)
        assert_datasets_close({"site": result["attn"]}, {"site": result["heads"]})


def test_without_the_span_path_and_with_it_the_subject_row_agrees(load_family, pairs_for):
    model, tokenizer = load_family("qwen2")
    pairs = pairs_for(model, tokenizer, examples=8, seed=1)
    sites = [s for s in ALL_SITES if s.component == "resid"]
    acts = extract(model, tokenizer, pairs, sites, batch_size=8)
    for spans in (True, False):
        _, _, engine = engines_agree(model, tokenizer, pairs, acts, sites, batch_size=8, spans=spans)
        assert (engine.stats["span_runs"] > 0) == spans


def _intervention_job(pairs_for, model, tokenizer, intervention, sites, examples, seed, batch_size):
    """Pairs and the sources the intervention writes in (ablation values for ablate-zero / ablate-mean)."""
    method, _, value = intervention.partition("-")
    pairs = pairs_for(model, tokenizer, examples, seed, method)
    sources = run_intervention(method, value=value or "mean").sources(
        pairs, lambda: extract(model, tokenizer, pairs, sites, batch_size=batch_size))
    return pairs, sources


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("keys_values", ["recorded", "not recorded"])
def test_runs_padded_to_a_common_width_equal_the_reference(load_family, pairs_for, monkeypatch, family, keys_values):
    """Runs of every width padded to the widest of their site (schedule.PADDING unbounded), for swaps at
    every site and for attention knockout; with the clean run's keys and values, and without them (every
    run then computes its whole prompt: widths are the prompts' lengths)."""
    from patchmap.engines.fast import clean, schedule
    monkeypatch.setattr(schedule, "PADDING", float("inf"))
    if keys_values == "not recorded":
        monkeypatch.setattr(clean._RecordingCache, "update", lambda self, keys, values, *args, **kwargs: (keys, values))
    model, tokenizer = load_family(family)
    pairs = pairs_for(model, tokenizer, examples=8, seed=3)
    sites = ALL_SITES + HEAD_SITES[:1]
    _, _, engine = engines_agree(model, tokenizer, pairs, extract(model, tokenizer, pairs, sites, batch_size=8),
                                 sites, batch_size=8)
    assert engine.stats["padded_runs"] > 0
    knockout = pairs_for(model, tokenizer, examples=8, seed=3, intervention="knockout")
    blocked = [s for s in ALL_SITES if s.component == "attn" and s.positions in ("subject", "subject_first")]
    _, _, engine = engines_agree(model, tokenizer, knockout, None, blocked, batch_size=8, window=2)
    assert engine.stats["padded_runs"] > 0 or keys_values == "recorded"  # knockout runs compute one position


def test_a_block_call_computes_the_mlp_at_real_positions_only():
    """Rows narrower than their call are padded at the end; the MLP runs at the real positions (the
    flattened [rows x width] tokens real_rows() names), also once rows are repeated and cut, as runs join."""
    from patchmap.engines.fast.schedule import RowIndex
    index = RowIndex(torch.tensor([0, 1, 2]), torch.tensor([4, 2, 6]), 3, 6, real=torch.tensor([2, 3, 1]))
    assert index.real_rows().tolist() == [0, 1, 3, 4, 5, 6]
    assert index.repeat(2).first(5).real_rows().tolist() == [0, 1, 3, 4, 5, 6, 9, 10, 12, 13, 14]
    assert RowIndex(torch.tensor([0, 1]), torch.tensor([1, 2]), 3, 2, real=torch.tensor([3, 3])).real_rows() is None
    assert RowIndex(torch.tensor([0, 1]), torch.tensor([1, 2]), 3, 2).real_rows() is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_last_block_computes_queries_outputs_and_mlp_at_last_positions_only(load_family, pairs_for, family):
    """In the last block only each run's last position feeds the output: the MLP and the attention's query
    and output projections (where they are modules of their own: GPT-2 fuses the query with the keys and
    values) compute there, in the patched runs and the clean run, while the block computes every position the
    runs compute."""
    model, tokenizer = load_family(family)
    pairs = pairs_for(model, tokenizer, examples=6, seed=1)
    sites = [Site("subj", "Subj.", "resid", "subject"), Site("last", "Last.", "resid", "last")]
    sources = extract(model, tokenizer, pairs, sites, batch_size=6)
    layer = models.n_layers(model) - 1
    modules = dict(zip(("query", "output")[-len(models.attention_output_modules(model, layer)):],
                       models.attention_output_modules(model, layer)))
    modules["mlp"] = models.mlp_modules(model, layer)[0]
    handed, computed = {"block": 0}, {name: 0 for name in modules}  # rows handed to the block, computed by each

    def count_handed(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        handed["block"] += x.numel() // x.shape[-1]

    def count_computed(name):
        def hook(module, args, output):  # registered first: runs before the engine's hooks scatter the rows
            computed[name] += output.numel() // output.shape[-1]
        return hook
    handles = [models.blocks(model)[layer].register_forward_pre_hook(count_handed, with_kwargs=True)]
    handles += [module.register_forward_hook(count_computed(name)) for name, module in modules.items()]
    engine = FastEngine(model)
    try:
        patch_job(model, tokenizer, pairs, sources, sites, batch_size=6, engine=engine)
    finally:
        for handle in handles:
            handle.remove()
    assert engine.stats["span_runs"] > 0 and computed["mlp"] < handed["block"]
    assert set(computed) == {"mlp", "output"} | ({"query"} if family == "llama" else set())
    assert all(rows == computed["mlp"] for rows in computed.values())


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_the_engines_kernels_compute_its_calls_and_the_model_keeps_its_own(load_family, pairs_for, family,
                                                                          monkeypatch):
    """In the fast engine's calls on the CPU its kernels compute (kernels.swaps): torch's fused GELU for
    gelu_new (GPT-2, Phi: the tanh approximation written as elementwise operations) and cpu_attention for the
    attention (the numbers agree with the reference: test_fast_equals_reference_for_every_site); the model
    has its own modules and attention implementation back after the job, and after a job that fails inside
    a block."""
    from transformers import AttentionInterface
    from transformers.activations import NewGELUActivation
    from patchmap.engines.fast import kernels
    model, tokenizer = load_family(family)
    pairs = pairs_for(model, tokenizer, examples=4, seed=1)
    sites = [Site("last", "Last.", "resid", "last")]
    sources = extract(model, tokenizer, pairs, sites, batch_size=4)
    own = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    assert len(own) == models.n_layers(model) and model.config._attn_implementation == "sdpa"
    calls = {"composed": 0, "fused": 0, "attention": 0}
    handles = [m.register_forward_hook(lambda *_: calls.update(composed=calls["composed"] + 1)) for m in own]
    fused = torch.nn.GELU.forward

    def counted(self, x):
        assert self.approximate == "tanh"
        calls["fused"] += 1
        return fused(self, x)

    def attention(module, *args, **kwargs):
        assert module.config._attn_implementation == kernels.CPU_ATTENTION
        calls["attention"] += 1
        return kernels.cpu_attention(module, *args, **kwargs)
    monkeypatch.setattr(torch.nn.GELU, "forward", counted)
    monkeypatch.setitem(AttentionInterface._global_mapping, kernels.CPU_ATTENTION, attention)
    try:
        patch_job(model, tokenizer, pairs, sources, sites, batch_size=4, engine=FastEngine(model))
    finally:
        for handle in handles:
            handle.remove()
    assert calls["composed"] == 0 and calls["fused"] > models.n_layers(model) and calls["attention"] > 0
    assert [m for m in model.modules() if isinstance(m, NewGELUActivation)] == own
    assert model.config._attn_implementation == "sdpa"

    def failing(self, x):
        raise RuntimeError("a failing kernel")
    monkeypatch.setattr(torch.nn.GELU, "forward", failing)
    with pytest.raises(RuntimeError, match="a failing kernel"):
        patch_job(model, tokenizer, pairs, sources, sites, batch_size=4, engine=FastEngine(model))
    assert [m for m in model.modules() if isinstance(m, NewGELUActivation)] == own
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("heads, kv_heads, mask_heads, boolean, rows_of_mask",
                         [(4, 4, 1, True, "each"), (6, 2, 1, False, "each"), (6, 3, 6, False, "each"),
                          (6, 2, 6, True, "each"), (4, 2, 1, False, "one")])
@pytest.mark.parametrize("keys", [7, 20])  # fewer than kernels.FEW_KEYS (softmax_ normalises itself) and more
def test_cpu_attention_equals_torchs(heads, kv_heads, mask_heads, boolean, rows_of_mask, keys):
    """cpu_attention gives torch's scaled_dot_product_attention, with key/value heads shared by groups of
    query heads, boolean or additive masks for all heads or each, per row or one for all rows."""
    from patchmap.engines.fast.kernels import FEW_KEYS, cpu_attention
    assert (keys < FEW_KEYS) == (keys == 7)
    torch.manual_seed(0)
    rows, width, dim = 5, 3, 8
    query = torch.randn(rows, heads, width, dim)
    key, value = torch.randn(2, rows, kv_heads, keys, dim)
    allowed = torch.rand(1 if rows_of_mask == "one" else rows, mask_heads, width, keys) < 0.7
    allowed[..., 0] = True  # every query attends to something
    mask = allowed if boolean else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got, weights = cpu_attention(None, query, key, value, mask, scaling=0.3)
    groups = heads // kv_heads
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask, scale=0.3)
    assert weights is None and got.shape == (rows, width, heads, dim)
    torch.testing.assert_close(got, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_cpu_attention_leaves_what_it_does_not_handle_to_sdpa(monkeypatch):
    """A missing mask, half precision and soft-capping go to transformers' sdpa function."""
    from transformers import AttentionInterface
    from patchmap.engines.fast.kernels import cpu_attention
    handed = []
    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", lambda *args, **kwargs: handed.append(kwargs))
    query = key = value = torch.randn(2, 2, 3, 4)
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    cpu_attention(None, query, key, value, None)
    cpu_attention(None, query.bfloat16(), key.bfloat16(), value.bfloat16(), mask)
    cpu_attention(None, query, key, value, mask, softcap=50.0)
    assert len(handed) == 3 and handed[2]["softcap"] == 50.0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("intervention", ["noise", "ablate-zero", "ablate-mean"])
def test_fast_equals_reference_for_noise_and_ablation(load_family, pairs_for, family, intervention):
    model, tokenizer = load_family(family)
    sites = ALL_SITES + HEAD_SITES
    pairs, acts = _intervention_job(pairs_for, model, tokenizer, intervention, sites, 8, 1, 4)
    reference, _, engine = engines_agree(model, tokenizer, pairs, acts, sites, batch_size=4)
    assert max(float(ds["js"].max()) for ds in reference.values()) > 0.05
    assert max(float(reference[s.name]["js"].max()) for s in HEAD_SITES) > 0.01
    # the span path (source keys and values in the prefix) needs a real source run: noise has one, ablation not
    assert (engine.stats["span_runs"] > 0) == (intervention == "noise")


def test_fast_equals_reference_for_noise_samples_at_head_sites(load_family, pairs_for):
    """Noised copies of each example (noise_samples) with a head site's heads sharing the block calls."""
    model, tokenizer = load_family("llama")
    sites = [HEAD_SITES[2], ALL_SITES[0]]
    intervention = run_intervention("noise", noise_samples=3)
    pairs = pairs_for(model, tokenizer, 6, 1, "noise")
    sources = intervention.sources(pairs, lambda: extract(model, tokenizer, pairs, sites, batch_size=3))
    reference, _, _ = engines_agree(model, tokenizer, pairs, sources, sites, batch_size=3, intervention=intervention)
    assert float(reference[HEAD_SITES[2].name]["js"].max()) > 0.01


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("intervention", ["swap", "noise", "ablate-mean"])
def test_fast_equals_reference_with_a_patch_window(load_family, pairs_for, family, intervention):
    """Windows of 2 and 3 layers (3-layer models: windows clipped at both ends, runs joining at different
    blocks) on every component and position group, and on one head site."""
    model, tokenizer = load_family(family)
    sites = ALL_SITES + HEAD_SITES[:1]
    pairs, acts = _intervention_job(pairs_for, model, tokenizer, intervention, sites, 6, 2, 3)
    for window in (2, 3):
        _, fast, engine = engines_agree(model, tokenizer, pairs, acts, sites, batch_size=3, window=window)
        assert engine.stats["patched_runs"] > 0
        assert (engine.stats["span_runs"] > 0) == (intervention != "ablate-mean")
    single = patch_job(model, tokenizer, pairs, acts, ALL_SITES, batch_size=3)
    assert any(np.abs(single[s.name]["js"].values - fast[s.name]["js"].values).max() > 1e-3 for s in ALL_SITES)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_fast_equals_reference_for_attention_knockout(load_family, pairs_for, family):
    """Knockout: the last position's attention to each position group blocked, in windows of 1 and 3."""
    model, tokenizer = load_family(family)
    sites = [s for s in ALL_SITES if s.component == "attn" and s.positions != "all"]  # knockout ignores the component
    pairs = pairs_for(model, tokenizer, examples=6, seed=2, intervention="knockout")
    for window in (1, 3):
        reference, _, engine = engines_agree(model, tokenizer, pairs, None, sites, batch_size=3, window=window)
        assert max(float(ds["js"].max()) for ds in reference.values()) > 0.01
        assert engine.stats["patched_runs"] > 0 and engine.stats["span_runs"] == 0
    everything, one_head = [Site("all", "All", "attn", "all")], [Site("heads", "Heads", "head", "subject")]
    for engine in ("fast", "reference"):
        with pytest.raises(UserError, match="would block every token the last one attends to"):
            patch_job(model, tokenizer, pairs, None, everything, batch_size=3, engine=engine)
        with pytest.raises(UserError, match="would block one head's edges"):
            patch_job(model, tokenizer, pairs, None, one_head, batch_size=3, engine=engine)


def test_the_fast_engine_names_layers_a_window_needs_but_were_not_extracted(load_family, pairs_for):
    model, tokenizer = load_family("llama")
    pairs = pairs_for(model, tokenizer, examples=4, seed=1)
    site = [Site("last", "Last.", "resid", "last")]
    acts = extract(model, tokenizer, pairs, site, layers=[1])
    with pytest.raises(UserError, match=r"no source activations at layers \[0, 2\]"):
        patch_job(model, tokenizer, pairs, acts, site, layers=[1], window=3)


def test_layout_modules_exist_and_are_distinct(each_family):
    model, _ = each_family
    for layer in range(models.n_layers(model)):
        modules = [models.component_module(model, c, layer) for c in COMPONENTS]
        assert len({id(m) for m in modules}) == len(COMPONENTS)
        # the head component's module is inside the attention: its output projection
        attention = models.attention_module(model, layer)
        assert any(m is modules[COMPONENTS.index("head")] for m in attention.modules())
    assert models.final_modules(model), "every family has a final norm"
    heads, head_dim = models.head_shape(model)
    assert heads == 4 and heads * head_dim == models.component_width(model, "head")  # query heads (4; kv: 2 or 4)


def test_padded_batch_equals_one_at_a_time(load_family, pairs_for):
    model, tokenizer = load_family("llama")
    pairs = pairs_for(model, tokenizer, examples=12, seed=2)
    assert len(set(pairs["length"].values.tolist())) > 1
    acts = extract(model, tokenizer, pairs, ALL_SITES, batch_size=12)
    together = patch_job(model, tokenizer, pairs, acts, ALL_SITES, batch_size=12)
    alone = patch_job(model, tokenizer, pairs, acts, ALL_SITES, batch_size=1)
    assert_datasets_close(alone, together)


def test_small_chunks_and_a_layer_subset_give_the_same_numbers(load_family, pairs_for):
    model, tokenizer = load_family("gpt2")
    pairs = pairs_for(model, tokenizer, examples=6, seed=1)
    sites, layers = ALL_SITES[::4], [2, 0]
    acts = extract(model, tokenizer, pairs, sites, layers=layers, batch_size=6)
    engines_agree(model, tokenizer, pairs, acts, sites, layers, batch_size=6, max_tokens=7)


def test_out_of_memory_backs_off_without_changing_results(load_family, pairs_for, caplog):
    model, tokenizer = load_family("llama")
    pairs = pairs_for(model, tokenizer, examples=8, seed=1)
    sites = [ALL_SITES[0], ALL_SITES[7], HEAD_SITES[2]]  # a head site's heads share block calls, split too
    acts = extract(model, tokenizer, pairs, sites, batch_size=8)
    plain = patch_job(model, tokenizer, pairs, acts, sites, batch_size=8)
    engine = FastEngine(model, max_tokens=10_000, fail_above=40)
    with caplog.at_level(logging.WARNING, logger="patchmap"):
        backed_off = patch_job(model, tokenizer, pairs, acts, sites, batch_size=8, engine=engine)
    assert engine.stats["oom_retries"] > 0 and engine.max_tokens <= 40
    assert "out of memory" in caplog.text and "retrying in halves" in caplog.text
    # smaller batches change matrix shapes, and with them float32 rounding: the same tolerance as fast vs reference
    assert_datasets_close(plain, backed_off)


def test_the_reference_engine_halves_a_batch_on_out_of_memory(load_family, pairs_for, caplog, monkeypatch):
    model, tokenizer = load_family("llama")
    pairs = pairs_for(model, tokenizer, examples=8, seed=1)
    sites = [ALL_SITES[0]]
    acts = extract(model, tokenizer, pairs, sites, batch_size=8)
    plain = patch_job(model, tokenizer, pairs, acts, sites, batch_size=8, engine="reference")
    patch_batch, sizes = reference_engine.patch_batch, []

    def small_memory(model, site, layers, target_ids, *args, **kwargs):
        sizes.append(len(target_ids))
        if len(target_ids) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return patch_batch(model, site, layers, target_ids, *args, **kwargs)
    monkeypatch.setattr(reference_engine, "patch_batch", small_memory)
    with caplog.at_level(logging.WARNING, logger="patchmap"):
        halved = patch_job(model, tokenizer, pairs, acts, sites, batch_size=8, engine="reference")
    assert sizes == [8, 4, 2, 2, 4, 2, 2]
    assert "out of memory patching examples 0-7" in caplog.text and "retrying in halves" in caplog.text
    assert_datasets_close(plain, halved)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 1099511627776 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_a_sites_numbers_do_not_depend_on_the_other_sites_of_its_job(load_family, pairs_for):
    """Each site's runs have block calls of their own: adding sites to a job leaves a site's numbers as they
    were, bit for bit (sites computing as many positions, at the last position, included)."""
    model, tokenizer = load_family("llama")
    pairs = pairs_for(model, tokenizer, examples=8, seed=4)
    at_last = [s for s in ALL_SITES if s.positions == "last"]
    acts = extract(model, tokenizer, pairs, ALL_SITES, batch_size=8)
    alone = patch_job(model, tokenizer, pairs, acts, at_last[:1], batch_size=8)
    together = patch_job(model, tokenizer, pairs, acts, at_last + ALL_SITES[:2], batch_size=8)
    for name in alone[at_last[0].name].data_vars:
        np.testing.assert_array_equal(together[at_last[0].name][name].values, alone[at_last[0].name][name].values,
                                      err_msg=name)


def test_a_head_that_does_not_reproduce_the_models_logits_is_refused(load_family, pairs_for):
    """The engine's own head gives every logit it compares (the clean run's too); where it differs from the
    model's own logits, checked on the longest prompts of the batch, the job stops with one patchmap error."""
    model, tokenizer = load_family("gpt2")
    pairs = pairs_for(model, tokenizer, examples=6, seed=1)
    assert len(set(pairs["length"].values.tolist())) > 1
    acts = extract(model, tokenizer, pairs, ALL_SITES[:1], batch_size=6)
    engine = FastEngine(model)
    head = engine.output_head
    engine.output_head = lambda hidden: head(hidden) + torch.arange(head.vocab) * 1e-2  # off by up to 10% of V
    with pytest.raises(UserError, match="does not reproduce the logits of architecture 'gpt2'"):
        patch_job(model, tokenizer, pairs, acts, ALL_SITES[:1], batch_size=6, engine=engine)


@pytest.mark.parametrize("samples", [1, 3])
def test_runs_that_change_nothing_get_the_targets_own_metrics_without_logits(load_family, pairs_for, samples):
    """A resid patch at the last layer before the last token leaves the output the clean one: the engine
    computes no logits for it and gives it the target's own metrics (both KLs and JS exactly 0), as the
    reference finds; at the last token, or at an earlier layer, the run is computed. With noise samples,
    every copy of such a run; a job of only such runs computes no patched run's logits."""
    model, tokenizer = load_family("llama")
    last_layer = models.n_layers(model) - 1
    subject, last = (next(s for s in ALL_SITES if s.name == f"resid-{p}") for p in ("subject", "last"))
    intervention = run_intervention("noise", noise_samples=samples) if samples > 1 else None
    pairs = pairs_for(model, tokenizer, 6, 1, "noise" if samples > 1 else "swap")

    def sources(sites, layers):
        def extracted():
            return extract(model, tokenizer, pairs, sites, layers=layers, batch_size=6)
        return intervention.sources(pairs, extracted) if intervention else extracted()

    layers = [0, last_layer]
    _, fast, engine = engines_agree(model, tokenizer, pairs, sources([subject, last], layers), [subject, last],
                                    layers, batch_size=6, intervention=intervention)
    unchanged = fast[subject.name].sel(layer=last_layer)
    for metric in ("js", "kl_patched_target", "kl_target_patched"):
        assert (unchanged[metric] == 0).all()
    assert (fast[last.name]["js"].sel(layer=last_layer) > 0).any()
    assert (fast[subject.name]["js"].sel(layer=0) > 0).any()
    rows = samples * pairs.sizes["example"]  # clean-run rows: the runs of one site and layer
    assert engine.stats["head_rows"] == 3 * rows  # 2 sites x 2 layers, but one
    assert engine.stats["target_head_rows"] == rows  # the unpatched targets' own, once
    _, fast, engine = engines_agree(model, tokenizer, pairs, sources([subject], [last_layer]), [subject],
                                    [last_layer], batch_size=6, intervention=intervention)
    assert engine.stats["head_rows"] == 0 and (fast[subject.name]["js"] == 0).all()


@pytest.mark.parametrize("samples", [1, 3])
def test_runs_scored_in_several_output_embedding_calls_get_the_references_numbers(load_family, pairs_for, samples,
                                                                                  monkeypatch):
    """A clean batch whose runs do not fit one output-embedding call (driver.HEAD_ROWS) is scored in equal
    chunks: the unpatched targets' rows lead the first, and each chunk's runs (with noise samples, all
    copies of a run in one chunk) are compared with their own targets."""
    model, tokenizer = load_family("llama")
    intervention = run_intervention("noise", noise_samples=samples) if samples > 1 else None
    pairs = pairs_for(model, tokenizer, 6, 1, "noise" if samples > 1 else "swap")
    sites, layers = ALL_SITES[:2], [0, 1]
    acts = extract(model, tokenizer, pairs, sites, layers=layers, batch_size=6)
    sources = intervention.sources(pairs, lambda: acts) if intervention else acts
    monkeypatch.setattr(driver, "HEAD_ROWS", 5 * samples)
    _, _, engine = engines_agree(model, tokenizer, pairs, sources, sites, layers, batch_size=6,
                                 intervention=intervention)
    runs = len(sites) * len(layers) * pairs.sizes["example"] * samples
    assert engine.stats["head_rows"] == runs and engine.stats["head_calls"] == -(-runs // (5 * samples))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_the_first_clean_run_asks_the_model_for_logits(load_family, pairs_for, family):
    """The engine's head is checked against the model's own logits of its first clean run, at one position
    (when the first batch is scored); the later batches' forwards compute none (their output embedding gets
    no rows); the numbers are the reference's."""
    model, tokenizer = load_family(family)
    pairs = pairs_for(model, tokenizer, examples=6, seed=1)
    acts = extract(model, tokenizer, pairs, ALL_SITES[:2], batch_size=2)
    engine = FastEngine(model)
    batched = patch_job(model, tokenizer, pairs, acts, ALL_SITES[:2], batch_size=2, engine=engine)
    assert engine.head_checked and engine.stats["clean_logit_rows"] == 1
    whole = patch_job(model, tokenizer, pairs, acts, ALL_SITES[:2], batch_size=6, engine="reference")
    assert_datasets_close(whole, batched)


def test_unknown_architecture_is_named_by_the_fast_engine():
    from transformers import BertConfig, BertLMHeadModel
    model = BertLMHeadModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(UserError, match="unsupported model architecture 'bert'; supported: .*gpt2.*llama"):
        FastEngine(model)


def test_config_chooses_the_engine():
    from patchmap import config as cfg
    schema = cfg.schema()
    engine = schema["properties"]["runs"]["additionalProperties"]["properties"]["engine"]
    assert engine["enum"] == ["fast", "reference"] and engine["default"] == "fast"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_benchmarks_flop_floor_lies_below_the_fast_schedule(load_family, pairs_for, family):
    """patchmap/engines/flops.py: the exact-work floor is a lower bound of any exact engine, so it must not
    exceed what the fast engine's counters say it computed, nor that the reference's full forwards."""
    model, tokenizer = load_family(family)
    pairs = pairs_for(model, tokenizer, examples=8, seed=1)
    sites = [Site("subj", "Subj.", "resid", "subject"), Site("attn", "Attn.", "attn", "last"),
             Site("last", "Last.", "resid", "last")]
    layers = list(range(models.n_layers(model)))
    engine = FastEngine(model)
    patch_job(model, tokenizer, pairs, extract(model, tokenizer, pairs, sites, batch_size=8), sites, batch_size=8,
              engine=engine)
    lengths = [int(n) for n in pairs["length"].values]
    assert engine.stats["span_runs"] > 0  # the floor assumes the subject's span path
    fast = flops.fast_flops(model, engine.stats, float(sum(n * n for n in lengths)))
    floor = flops.floor_flops(model, lengths, pairs["subject_end"].values)
    reference = flops.reference_flops(model, len(sites) * (len(layers) + 1), *flops.padded_batches(lengths, 8))
    assert 0 < floor <= fast < reference
