"""Head sites and token traces through the `snakemake` command, on the shipped default model (its trained
weights move the answer far, so that the comparisons mean something): a trace cell at a single-token
position equals a one-fact run of the same intervention and window at that site, and a run that mixes head
and other sites stores the others exactly as a run without heads does."""

import copy
import json

import numpy as np
import pytest
import xarray as xr
from test_builtin import default_config
from tolerances import TOLERANCES, assert_metric_close
from workflow_utils import snakemake, write_config

from patchmap import synthetic

DEFAULT = default_config()
MODEL = {"facts-llama": DEFAULT["models"]["facts-llama"]}  # the default spec: the shipped weights, no training
WORLD = DEFAULT["datasets"]["synthetic-facts"]["synthetic"]
SITES = {"attn": {"label": "Attn.", "component": "attn", "positions": "last"},"resid-subject-last": {"component": "resid", "positions": "subject_last"},
         "resid-last": {"component": "resid", "positions": "last"},
         "mlp-last": {"component": "mlp", "positions": "last"},
         "attn-subject-last": {"component": "attn", "positions": "subject_last"},
         "heads": {"label": "Heads", "component": "head", "positions": "last"}}
ONE_FACT = {"model": "facts-llama", "examples": 1, "shard_size": 1, "known_only": False}
HEADS = {"model": "facts-llama", "dataset": "some", "examples": 6, "shard_size": 3, "batch_size": 3}


def swap_pair(facts):
    """Two facts whose prompts differ only in the subject, with other answers."""
    return next((a, b) for i, a in enumerate(facts) for b in facts[i + 1:]
                if a["relation"] == b["relation"] and a["attribute"] != b["attribute"]
                and a["prompt"][len(a["subject"]):] == b["prompt"][len(b["subject"]):]
                and len(a["subject"].split()) == len(b["subject"].split()))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("heads-and-traces")
    facts = synthetic.facts(synthetic.make_world(**WORLD))
    a, b = swap_pair(facts)
    for name, rows in (("one", [facts[0]]), ("two", [a, b]), ("some", facts[:40])):
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"models": copy.deepcopy(MODEL), "datasets": {
        "synthetic-facts": DEFAULT["datasets"]["synthetic-facts"], **{name: {"path": f"{name}.jsonl"}
                                                                      for name in ("one", "two", "some")}},
              "sites": SITES}
    noise = {**ONE_FACT, "dataset": "one", "intervention": "noise", "noise_samples": 3}
    config["runs"] = {
        "noise1": {**noise, "sites": ["resid-subject-last", "resid-last"]},
        "noise2": {**noise, "window": 2, "sites": ["mlp-last", "attn-subject-last"]},
        "swap1": {**ONE_FACT, "dataset": "two", "sites": ["resid-last", "attn-subject-last"]},
        "mixed": {**HEADS, "sites": ["attn", "heads"]},
        "attn-only": {**HEADS, "sites": ["attn"]},
    }
    config["traces"] = {
        "noise": {"model": "facts-llama", "dataset": "one", "facts": [facts[0]["id"]], "noise_samples": 3,
                  "window": {"resid": 1, "mlp": 2, "attn": 2}},
        "swap": {"model": "facts-llama", "dataset": "two", "intervention": "swap", "components": ["resid", "attn"],
                 "facts": [{"id": a["id"], "source": b["id"]}, {"id": b["id"], "source": a["id"]}],
                 "window": {"resid": 1, "attn": 1}},
    }
    write_config(workdir, config)
    targets = [f"results/{run}/divergence.nc" for run in config["runs"]] + [
        "results/mixed/heatmap.png", "results/mixed/lines.png", f"results/traces/noise/{facts[0]['id']}.png",
        "results/traces/swap/trace.nc"]
    result = snakemake(workdir, *targets)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, facts[0]


def cells_equal(trace, run, cells):
    """Each (component, token, site) cell of a trace's fact equals the run's only example at that site."""
    for component, token, site in cells:
        for metric in TOLERANCES:
            assert_metric_close(metric, trace[metric].sel(component=component, token=token).values,
                                run[metric].sel(site=site).isel(example=0).values, f"{component}@{token} {site}")


def test_a_noise_trace_cell_equals_a_one_fact_run_at_that_site(finished):
    workdir, fact = finished
    trace = xr.load_dataset(workdir / "results/traces/noise/trace.nc", group=fact["id"])
    subject_last, last = int(np.flatnonzero(trace["subject"].values)[-1]), trace.sizes["token"] - 1
    one, two = (xr.load_dataset(workdir / f"results/{run}/divergence.nc") for run in ("noise1", "noise2"))
    assert one.attrs["noise_samples"] == trace.attrs["noise_samples"] == 3
    cells_equal(trace, one, [("resid", subject_last, "resid-subject-last"), ("resid", last, "resid-last")])
    cells_equal(trace, two, [("mlp", last, "mlp-last"), ("attn", subject_last, "attn-subject-last")])
    assert float(trace["js"].max()) > 0.5 and trace["window"].sel(component="mlp") == 2


def test_a_swap_trace_cell_equals_a_one_fact_run_at_that_site(finished):
    workdir, _ = finished
    run = xr.load_dataset(workdir / "results/swap1/divergence.nc")
    target = str(run["example"].values[0])  # the run's pairing chose which of the two is the target
    trace = xr.load_dataset(workdir / "results/traces/swap/trace.nc", group=target)
    assert trace.attrs["source_prompt"] == str(run["source_prompt"].values[0])
    subject_last, last = int(np.flatnonzero(trace["subject"].values)[-1]), trace.sizes["token"] - 1
    cells_equal(trace, run, [("resid", last, "resid-last"), ("attn", subject_last, "attn-subject-last")])
    assert float(trace["js"].sel(component="resid", token=last).max()) > 0.5


def test_the_trace_file_and_figures(finished):
    workdir, fact = finished
    tree = xr.open_datatree(workdir / "results/traces/swap/trace.nc")
    assert len(tree.children) == 2 and tree.attrs["trace"] == "swap" and len(tree.attrs["model_weights_sha256"]) == 64
    assert (workdir / f"results/traces/noise/{fact['id']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / f"results/traces/noise/{fact['id']}.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_run_mixing_head_and_other_sites(finished):
    workdir, _ = finished
    mixed = xr.load_dataset(workdir / "results/mixed/divergence.nc")
    plain = xr.load_dataset(workdir / "results/attn-only/divergence.nc")
    # the other sites: today's variables, the same numbers as a run without heads
    for name in plain.data_vars:
        assert mixed[name].dims == plain[name].dims
        np.testing.assert_array_equal(mixed[name].values, plain[name].values, err_msg=name)
    # the head sites: along head_site, in head_ variables
    assert mixed["head_js"].dims == ("example", "head_site", "layer", "head")
    assert mixed["head_js_mean"].dims == ("head_site", "layer", "head")
    assert list(mixed["head_site"].values) == ["Heads"] and list(mixed["head_positions"].values) == ["last"]
    assert mixed.sizes["head"] == MODEL["facts-llama"]["builtin"]["heads"]
    assert float(mixed["head_js_mean"].max()) > 0.1
    np.testing.assert_allclose(mixed["head_js_mean"].values, mixed["head_js"].values.mean(axis=0), rtol=1e-6)
    assert (mixed["head_js_ci_low"] <= mixed["head_js_mean"] + 1e-9).all()
    assert (workdir / "results/mixed/heatmap.png").stat().st_size > 0
