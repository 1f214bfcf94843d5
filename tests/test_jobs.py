"""Jobs and model loads: one load per job, every site in one patch job per shard of the pairs found,
predictions once per model and dataset, and a local checkpoint's files as inputs of the results made from
it."""

import copy
import re
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from transformers import LlamaForCausalLM
from workflow_utils import (REPO, TINY, count_model_loads, count_model_loads_in, finished_workflow, snakemake,
                            write_config)

from patch_runs import extract, patch_job, run_intervention

from patchmap import config as cfg
from patchmap import pairs, predictions, provenance, shards, summary, synthetic
from patchmap.ablation import ablation_values
from patchmap.builtin import llama_config, word_tokenizer
from patchmap.errors import UserError
from patchmap.sites import Site

# 2 shards (8 examples in shards of 4) of 3 sites, under three interventions on one model and dataset
JOBS = copy.deepcopy(TINY)
JOBS["runs"] = {
    "swap": {**TINY["runs"]["tiny"], "examples": 8, "shard_size": 4},
    "ablated": {**TINY["runs"]["tiny"], "examples": 8, "shard_size": 4, "intervention": "ablate", "value": "mean"},
    "knocked": {**TINY["runs"]["tiny"], "examples": 8, "shard_size": 4, "intervention": "knockout"},
}


# the case: a run asks for 1,000 examples of a dataset of 24 facts (6 subjects x 4 relations; with
# no filler names every fact has a partner), in shards of 8: 24 pairs, 3 shards
FEW = copy.deepcopy(TINY)
FEW["datasets"]["few-facts"] = {"synthetic": {**TINY["datasets"]["tiny-facts"]["synthetic"], "subject_sets": 3,
                                              "max_filler": 0}}
FEW["runs"] = {"few": {**TINY["runs"]["tiny"], "dataset": "few-facts", "examples": 1000, "shard_size": 8}}


def documented_model_loads(config, pairs_found):
    """docs/workflow.md, "Jobs and model loads": one load per (model, dataset, dtype) for the predictions,
    and per run one per shard of the pairs it found (the patch jobs), twice that for ablate (its extract
    jobs). `pairs_found`: {run: its number of pairs}."""
    predictions = {(r["model"], r["dataset"], r["dtype"]) for r in config["runs"].values()}
    return len(predictions) + sum(shards.count(pairs_found[name], r["shard_size"])
                                  * (2 if r["intervention"] == "ablate" else 1) for name, r in config["runs"].items())


def pairs_found(workdir, config):
    return {run: xr.load_dataset(workdir / "results" / run / "pairs.nc").attrs["count_pairs"] for run in config["runs"]}


@pytest.fixture(scope="module")
def finished_jobs(tmp_path_factory):
    return finished_workflow(tmp_path_factory, "jobs", JOBS)


@pytest.fixture(scope="module")
def finished_few(tmp_path_factory):
    return finished_workflow(tmp_path_factory, "few", FEW)


def test_model_loads_follow_the_documented_formula(finished_jobs):
    validated = cfg.validate(copy.deepcopy(JOBS))
    assert pairs_found(finished_jobs, JOBS) == {"swap": 8, "ablated": 8, "knocked": 8}
    assert documented_model_loads(validated, pairs_found(finished_jobs, JOBS)) == 1 + 2 + 2 * 2 + 2
    assert count_model_loads(finished_jobs) == documented_model_loads(validated, pairs_found(finished_jobs, JOBS))
    for run in JOBS["runs"]:  # pairing needs the tokenizer only
        assert "loaded model" not in (finished_jobs / "results" / run / "logs" / "pairs.log").read_text()


def test_one_patch_file_per_shard_holds_every_site(finished_jobs):
    for run in JOBS["runs"]:
        for shard in (0, 1):
            ds = xr.load_dataset(finished_jobs / "results" / run / "patch" / f"{shard}.nc")
            assert list(ds["site"].values) == ["subj", "attn", "mlp"] and ds.sizes["example"] == 4
    results = finished_jobs / "results"
    assert sorted(p.name for p in (results / "swap" / "activations").iterdir()) == ["0.nc", "1.nc"]
    assert not (results / "knocked" / "activations").exists()  # knockout needs no activations


def test_runs_on_one_model_and_dataset_share_one_prediction(finished_jobs):
    results = finished_jobs / "results"
    predicted = xr.load_dataset(results / "predictions" / "tiny" / "tiny-facts" / "float32.nc")
    assert predicted.attrs["model"] == "tiny" and predicted.attrs["dataset"] == "tiny-facts"
    assert len(predicted.attrs["model_weights_sha256"]) == 64
    for run in JOBS["runs"]:
        p = xr.load_dataset(results / run / "pairs.nc")
        row = predicted.sel(fact=p["target_id"].values)
        np.testing.assert_array_equal(p["target_top1"].values, row["top1"].values)
        np.testing.assert_array_equal(p["target_p_answer"].values, row["p_answer"].values)


def test_a_pairs_file_makes_shards_of_its_pairs_none_of_them_empty(tmp_path):
    path = tmp_path / "pairs.nc"
    xr.Dataset({"length": ("example", np.arange(24))}, coords={"example": [f"f{i}" for i in range(24)]}).to_netcdf(
        path)
    assert shards.example_count(path) == 24
    assert list(shards.shards_of(path, 8)) == [0, 1, 2]
    assert [shards.bounds(24, 10, s) for s in shards.shards_of(path, 10)] == [(0, 10), (10, 20), (20, 24)]
    assert shards.shortfall(1000, 24, 30) == ("asked for 1,000 examples, found 24 pairs in 30 facts; "
                                              "the run uses those 24")
    assert shards.shortfall(24, 24, 30) is None


def test_shards_follow_the_pairs_found_not_the_examples_asked_for(finished_few, capsys):
    results = finished_few / "results" / "few"
    pairs_log = (results / "logs" / "pairs.log").read_text()
    line = "asked for 1,000 examples, found 24 pairs in 24 facts; the run uses those 24"
    assert pairs_log.count(line) == 1 and "24 pairs: 3 shards of 8" in pairs_log
    # 3 patch jobs, one model load each, and one for the predictions: nothing for the 122 empty shards
    patch_logs = sorted(p.name for p in (results / "logs" / "patch").iterdir())
    assert patch_logs == ["0.log", "1.log", "2.log"]
    assert sorted(p.name for p in (results / "patch").iterdir()) == ["0.nc", "1.nc", "2.nc"]
    assert [count_model_loads_in(results / "logs" / "patch" / log) for log in patch_logs] == [1, 1, 1]
    assert count_model_loads(finished_few) == 1 + 3
    assert count_model_loads(finished_few) == documented_model_loads(cfg.validate(copy.deepcopy(FEW)), {"few": 24})
    ds = xr.load_dataset(results / "divergence.nc")
    assert ds.sizes["example"] == 24 and ds.attrs["count_pairs"] == 24
    assert ds.attrs["count_examples_requested"] == 1000
    assert ds.attrs[shards.SHORTFALL] == line
    summary.main([str(results / "divergence.nc")])
    assert line in capsys.readouterr().out


def test_once_the_pairs_exist_a_dry_run_plans_their_shards(finished_few, tmp_path):
    workdir = tmp_path / "few"
    shutil.copytree(finished_few, workdir)
    shutil.rmtree(workdir / "results" / "few" / "patch")
    (workdir / "results" / "few" / "divergence.nc").unlink()
    result = snakemake(workdir, "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["patch"] == 3 and "pairs" not in counts and "predictions" not in counts


def test_a_shard_the_pairs_do_not_fill_fails_before_loading_the_model(finished_few, tmp_path):
    workdir = tmp_path / "few"
    shutil.copytree(finished_few, workdir)
    result = snakemake(workdir, "results/few/patch/3.nc")  # named by hand: the workflow never plans it
    assert result.returncode != 0
    log = (workdir / "results" / "few" / "logs" / "patch" / "3.log").read_text()
    assert "patchmap: run 'few' has no shard 3: its 24 pairs make 3 shards of 8 (0 to 2)" in log
    assert count_model_loads_in(workdir / "results" / "few" / "logs" / "patch" / "3.log") == 0
    assert not (workdir / "results" / "few" / "patch" / "3.nc").exists()


def job_counts(dry_run_output):
    """{rule: count} from the job-count table of `snakemake --dry-run`."""
    table = dry_run_output[dry_run_output.index("Job stats:"):]
    return {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)$", table.split("total")[0], re.M)}


def test_paper_config_plans_one_predictions_job_per_model_and_dataset_and_its_shards_after_the_pairs(tmp_path):
    result = snakemake(tmp_path, "--configfile", str(REPO / "config" / "paper.yaml"), "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    paper = cfg.load(REPO / "config" / "paper.yaml")
    runs = paper["runs"].values()
    assert counts["predictions"] == len({(r["model"], r["dataset"], r["dtype"]) for r in runs})
    assert counts["pairs"] == len(runs) and counts["model_identity"] == len({r["model"] for r in runs})
    assert counts["divergence"] == len(runs)
    # The shards come from the pairs found (the pairs checkpoint), which the known filter decides on each
    # model: before the pairs exist, a dry run cannot know them and plans no job that runs a model on a
    # shard. test_shards_follow_the_pairs_found_not_the_examples_asked_for counts them on a finished run.
    assert not {"patch", "patch_without_extraction", "extract", "ablation"} & set(counts)
    assert "checkpoint jobs" in result.stdout


@pytest.mark.parametrize("intervention", ["swap", "noise", "knockout"])
def test_all_sites_in_one_call_equal_one_site_at_a_time(tiny_model, pairs_for, intervention):
    model, tokenizer = tiny_model
    sites = [Site("subj", "Subj.", "resid", "subject"), Site("attn", "Attn.", "attn", "last"),
             Site("mlp", "MLP", "mlp", "subject_last")]
    p = pairs_for(model, tokenizer, examples=6, intervention=intervention)
    acts = run_intervention(intervention).sources(p, lambda: extract(model, tokenizer, p, sites))
    together = patch_job(model, tokenizer, p, acts, sites)
    for site in sites:
        alone = patch_job(model, tokenizer, p, acts, [site])[site.name]
        np.testing.assert_allclose(together[site.name]["js"].values, alone["js"].values, atol=1e-6)


@pytest.mark.parametrize("intervention", ["swap", "noise"])
def test_pairs_from_shared_predictions_equal_the_in_memory_pairs(tiny_model, world, pairs_for, intervention):
    model, tokenizer = tiny_model
    facts = synthetic.facts(world)
    predicted = predictions.predict_facts(model, tokenizer, facts, batch_size=8)
    workflow = pairs.pairs_from_predictions(tokenizer, facts, predicted, 6, 0, known_only=False,
                                            intervention=run_intervention(intervention))
    in_memory = pairs_for(model, tokenizer, 6, 0, intervention)
    for name in ("target_ids", "source_ids", "target_top1", "source_top1", "target_answer"):
        np.testing.assert_array_equal(workflow[name].values, in_memory[name].values)
    np.testing.assert_allclose(workflow["target_p_answer"].values, in_memory["target_p_answer"].values, atol=1e-6)
    if intervention == "noise":
        assert workflow.attrs["noise_std"] == pytest.approx(in_memory.attrs["noise_std"], rel=1e-5)


def test_the_api_predicts_only_the_facts_that_pairing_needs(tiny_model, world, pairs_for, monkeypatch):
    model, tokenizer = tiny_model
    facts = synthetic.facts(world)
    predicted = []
    original = pairs.baseline_predictions

    def counting(model, encoded, pad_id, batch_size):
        predicted.append(len(encoded))
        original(model, encoded, pad_id, batch_size)

    monkeypatch.setattr(pairs, "baseline_predictions", counting)
    ds = pairs_for(model, tokenizer, examples=3)
    assert sum(predicted) <= 6 < len(facts)  # the 3 targets and their sources only
    assert ds.attrs["count_not_predicted"] == len(facts) - sum(predicted)
    predicted.clear()
    with pytest.raises(UserError, match="no pairs left"):  # a random model knows none: every fact is tried
        pairs.make_pairs(model, tokenizer, facts, examples=3, seed=0, known_only=True, batch_size=4)
    assert predicted[0] == 6 and predicted[1] == 12 and sum(predicted) == len(facts)  # chunks, doubling


def save_random_llama(path, world, seed):
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(synthetic.vocabulary(world))
    LlamaForCausalLM(llama_config(tokenizer, layers=2, hidden=32, heads=2, mlp=64)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_a_replaced_local_checkpoint_redoes_the_results(tmp_path):
    world = synthetic.make_world(**TINY["datasets"]["tiny-facts"]["synthetic"])
    checkpoint = tmp_path / "checkpoint"
    save_random_llama(checkpoint, world, seed=0)
    config = {"models": {"local": {"path": str(checkpoint)}}, "datasets": TINY["datasets"],
              "sites": {"subj": TINY["sites"]["subj"]},
              "runs": {"local": {"model": "local", "dataset": "tiny-facts", "sites": ["subj"], "examples": 4,
                                 "shard_size": 4, "known_only": False}}}
    write_config(tmp_path, config)
    first = snakemake(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    before = xr.load_dataset(tmp_path / "results" / "local" / "divergence.nc")
    assert before.attrs["model_weights_sha256"] == provenance.weights_sha256(checkpoint)

    save_random_llama(checkpoint, world, seed=1)  # retrained in the same folder: other weights
    second = snakemake(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Nothing to be done" not in second.stdout + second.stderr
    after = xr.load_dataset(tmp_path / "results" / "local" / "divergence.nc")
    assert after.attrs["model_weights_sha256"] == provenance.weights_sha256(checkpoint)
    assert after.attrs["model_weights_sha256"] != before.attrs["model_weights_sha256"]
    assert not np.array_equal(after["js"].values, before["js"].values)
    predicted = xr.load_dataset(tmp_path / "results" / "predictions" / "local" / "tiny-facts" / "float32.nc")
    assert predicted.attrs["model_weights_sha256"] == after.attrs["model_weights_sha256"]
    identity = yaml.safe_load((tmp_path / "results" / "models" / "local.json").read_text())
    assert identity["files"]["model.safetensors"] and identity["files"]["tokenizer.json"]


def test_the_ablation_mean_spans_shards_with_different_numbers_of_slots():
    """Each shard's activations have as many slots as its longest position group: 2 in one, 3 in the other."""
    rng = np.random.default_rng(0)

    def shard(n, slots, used):
        act = rng.normal(size=(n, 1, slots, 4))
        for i, k in enumerate(used):
            act[i, :, k:] = np.nan
        return xr.Dataset({"act_rel": (("example", "layer", "slot_rel", "hidden"), act)}, coords={"layer": [0]})

    shards = [shard(2, 2, [2, 1]), shard(2, 3, [3, 1])]
    values = ablation_values(shards, "mean")["act_rel"].values  # [layer, slot, hidden]
    together = np.full((4, 1, 3, 4), np.nan)
    together[:2, :, :2], together[2:] = shards[0]["act_rel"].values, shards[1]["act_rel"].values
    np.testing.assert_allclose(values, np.nanmean(together, axis=0), rtol=1e-6)
