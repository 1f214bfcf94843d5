"""The workflow end to end through the `snakemake` command, on a tiny config in a temporary directory."""

import copy

import numpy as np
import pytest
import xarray as xr
import yaml
from workflow_utils import TINY, finished_workflow, snakemake, write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return finished_workflow(tmp_path_factory, "workflow", TINY)


def test_writes_the_heatmap_and_divergence(finished_run):
    out = finished_run / "results" / "tiny"
    for name in ("heatmap.png", "heatmap.pdf", "divergence.nc", "pairs.nc"):
        assert (out / name).stat().st_size > 0, name
    assert (finished_run / "results" / "datasets" / "tiny-facts" / "facts.jsonl").stat().st_size > 0
    assert (finished_run / "results" / "predictions" / "tiny" / "tiny-facts" / "float32.nc").stat().st_size > 0
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "heatmap.pdf").read_bytes()[:5] == b"%PDF-"
    # one patch job per shard, every site in it, and the swap run's activations written beside it
    assert sorted(p.name for p in (out / "patch").iterdir()) == ["0.nc", "1.nc", "2.nc"]
    assert sorted(p.name for p in (out / "activations").iterdir()) == ["0.nc", "1.nc", "2.nc"]
    model_dir = finished_run / "results" / "models" / "tiny"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()


def test_divergence_is_labelled(finished_run):
    ds = xr.load_dataset(finished_run / "results" / "tiny" / "divergence.nc")
    assert ds["js"].dims == ("example", "site", "layer")
    assert ds["js"].sizes == {"example": 12, "site": 3, "layer": 2}
    assert ds["top_token"].dims == ("example", "site", "layer", "rank") and ds.sizes["rank"] == 5
    assert ds["target_top_token"].dims == ("example", "rank")
    named = np.union1d(np.unique(ds["top_token"].values), np.unique(ds["target_top_token"].values))
    assert set(named.tolist()) <= set(ds["token_id"].values.tolist())
    assert all(isinstance(t, str) for t in ds["token_text"].values)
    assert list(ds["site"].values) == ["Subj.", "Attn.", "MLP rel."]
    assert list(ds["component"].values) == ["resid", "attn", "mlp"]
    assert list(ds["positions"].values) == ["subject", "last", "relation"]
    assert list(ds["layer"].values) == [0, 1]
    assert len(set(ds["example"].values)) == 12
    for name in ("js_mean", "js_ci_low", "js_ci_high"):
        assert ds[name].dims == ("site", "layer")
    js = ds["js"].values
    assert np.isfinite(js).all() and (js >= 0).all() and (js <= 1).all()
    np.testing.assert_allclose(ds["js_mean"].values, js.mean(axis=0), rtol=1e-6)
    assert (ds["js_ci_low"].values <= ds["js_mean"].values + 1e-9).all()
    assert (ds["js_ci_high"].values >= ds["js_mean"].values - 1e-9).all()
    assert set(np.unique(ds["flip"].values)) <= {0, 1}
    assert ds["js"].attrs["units"] == "bits"
    attrs = ds.attrs
    assert attrs["model"] == "tiny" and len(attrs["model_weights_sha256"]) == 64
    assert attrs["dataset"] == "tiny-facts" and len(attrs["dataset_sha256"]) == 64
    assert attrs["intervention"] == "swap" and attrs["js_base"] == "2" and attrs["seed"] == 0
    assert yaml.safe_load(attrs["config_yaml"])["run"]["tiny"]["examples"] == 12
    assert attrs["version_torch"] and attrs["version_transformers"] and attrs["version_patchmap"]
    assert attrs["count_pairs"] == 12


def test_second_run_has_nothing_to_do(finished_run):
    result = snakemake(finished_run)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda c: c["runs"]["tiny"].update(intervention="swop"),
     "config error at runs.tiny.intervention: 'swop' is not one of ['swap', 'noise', 'ablate', 'knockout']"),
    (lambda c: c["runs"]["tiny"].update(sites=["subj", "nope"]),
     "config error at runs.tiny.sites: site 'nope' is not defined; defined sites: subj, attn, mlp"),
    (lambda c: c["sites"]["subj"].update(component="residual"),
     "config error at sites.subj.component: 'residual' is not one of ['resid', 'attn', 'mlp', 'head']"),
])
def test_bad_config_fails_with_one_clear_line(tmp_path, change, message):
    config = copy.deepcopy(TINY)
    change(config)
    write_config(tmp_path, config)
    result = snakemake(tmp_path, "--dry-run")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
