"""Real-model path: known_1000-format data fetched by the download rule, tiny checkpoints of several
families with BPE tokenizers, swap and noise runs, a figure grid, and the HTML report."""

import hashlib

import pytest
import xarray as xr
import yaml
from families import KNOWN_1000, bpe_tokenizer, known_facts_text, save_checkpoint, stand_in_facts
from workflow_utils import snakemake, write_config

FAMILIES = ["llama", "gpt2", "gpt_neox"]


@pytest.fixture(scope="module")
def known_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("known")
    if KNOWN_1000.exists():
        source = KNOWN_1000
    else:  # a stand-in in the same format
        import json
        source = workdir / "known_1000.json"
        source.write_text(json.dumps(stand_in_facts()))
    tokenizer = bpe_tokenizer(known_facts_text())
    sites = {"subj": {"label": "Subj.", "component": "resid", "positions": "subject"},
             "after": {"label": "First after", "component": "attn", "positions": "after_subject_first"}}
    run = {"dataset": "known", "sites": ["subj", "after"], "examples": 20, "shard_size": 20,
           "batch_size": 10, "known_only": False}
    config = {
        "models": {f: {"path": str(save_checkpoint(workdir / "models" / f, f, tokenizer))} for f in FAMILIES},
        "datasets": {"known": {"url": source.resolve().as_uri(), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}},
        "sites": sites,
        "runs": {**{f: {"model": f, **run} for f in FAMILIES},
                 "llama-noise": {"model": "llama", **run, "intervention": "noise"}},
        "figures": {"families": {"runs": FAMILIES, "columns": 3}},
    }
    write_config(workdir, config)
    result = snakemake(workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, config, source


@pytest.mark.parametrize("run", FAMILIES + ["llama-noise"])
def test_known_facts_run_end_to_end(known_run, run):
    workdir, config, source = known_run
    ds = xr.load_dataset(workdir / "results" / run / "divergence.nc")
    assert ds.sizes["example"] == 20 and ds.sizes["layer"] == 2
    assert list(ds["site"].values) == ["Subj.", "First after"]
    assert list(ds["positions"].values) == ["subject", "after_subject_first"]
    assert ds.attrs["count_facts"] == len(yaml.safe_load(source.read_text()))
    assert ds.attrs["count_dropped_not_known"] == 0  # the known filter is off for random models
    kept = ds.attrs["count_facts"] - ds.attrs["count_dropped_subject_not_in_prompt"]
    assert ds.attrs["count_pairs"] == 20 and ds.attrs["count_dropped_no_partner"] <= kept - 20
    assert ds.attrs["dataset_sha256"] == config["datasets"]["known"]["sha256"]
    assert ds.attrs["dataset_source"] == config["datasets"]["known"]["url"]
    assert len(ds.attrs["model_weights_sha256"]) == 64
    assert ds.attrs["model_source"] == config["models"][ds.attrs["model"]]["path"]
    assert ds.attrs["intervention"] == ("noise" if run == "llama-noise" else "swap")
    assert (ds["js"].values >= 0).all() and (ds["js"].values <= 1).all()
    for name in ("heatmap.png", "lines.png", "lines.pdf"):
        assert (workdir / "results" / run / name).stat().st_size > 0
    if run != "llama-noise":  # swap sources differ from their targets in the subject
        pairs = xr.load_dataset(workdir / "results" / run / "pairs.nc")
        assert (pairs["target_answer"] != pairs["source_answer"]).all()
        assert (pairs["relation"].values == pairs["relation"].values).all()


def test_figure_grid_and_report(known_run):
    workdir, _, _ = known_run
    assert (workdir / "results" / "figures" / "families.png").stat().st_size > 0
    assert (workdir / "results" / "figures" / "families.pdf").stat().st_size > 0
    result = snakemake(workdir, "--report", "report.html")
    assert result.returncode == 0, result.stderr[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    assert "heatmap.png" in html and "families.png" in html and "lines.png" in html


def test_wrong_checksum_is_reported(known_run, tmp_path):
    workdir, config, _ = known_run
    bad = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))
    bad["datasets"]["known"]["sha256"] = "0" * 64
    bad["runs"] = {"llama": bad["runs"]["llama"]}
    bad.pop("figures")
    write_config(tmp_path, bad)
    result = snakemake(tmp_path, "--until", "download_dataset")
    assert result.returncode != 0
    assert "but the config expects 0000" in result.stderr
    assert not (tmp_path / "results" / "datasets" / "known.json").exists()
