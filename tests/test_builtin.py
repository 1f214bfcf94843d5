"""The built-in model: training is the same bit for bit whatever the caller's threads, it stops at its
target or fails loudly, and the shipped default weights are the ones the default config asks for."""

import json

import pytest
import torch
import yaml

from patchmap import builtin, shipped, stages
from patchmap import config as cfg
from patchmap.errors import UserError
from patchmap.schema import SCHEMA

WORLD = {"seed": 1, "name_pool": 8, "subject_sets": 5, "orders": 2, "max_filler": 3, "filler_variants": 1}
SHAPE = {"layers": 2, "hidden": 16, "heads": 2, "mlp": 32}
SHORT = {"seed": 0, "max_steps": 6, "schedule_steps": 6, "batch_size": 8, "lr": 0.003, "weight_decay": 0.01,
         "eval_every": 6, "target_accuracy": 0.0}


def default_config(name="config.yaml"):
    return cfg.validate(yaml.safe_load((SCHEMA.parent / name).read_text()))


def default_spec(config, model="facts-llama"):
    return shipped.settings_from_config(config, model)


def shipped_default(config):
    found = shipped.shipped_model(shipped.training_spec(*default_spec(config)))
    assert found is not None, ("no shipped weights were trained from the default spec; make them with "
                                 "python benchmarks/retrain_default.py --out patchmap/pretrained/facts-llama")
    return found


def train_with_caller_threads(threads, out):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summary = builtin.train_builtin(out, WORLD, SHAPE, SHORT)
        assert torch.get_num_threads() == threads  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    return summary


def test_training_is_identical_with_one_and_two_caller_threads(tmp_path):
    one = train_with_caller_threads(1, tmp_path / "one")
    two = train_with_caller_threads(2, tmp_path / "two")
    assert one["steps"] == two["steps"] == SHORT["max_steps"]
    assert one["weights_sha256"] == two["weights_sha256"]
    for run in ("one", "two"):
        recorded = json.loads((tmp_path / run / "training.json").read_text())
        assert recorded["weights_sha256"] == shipped.saved_weights_sha256(tmp_path / run) == one["weights_sha256"]
        assert recorded["spec"] == shipped.training_spec(WORLD, SHAPE, SHORT)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()


def test_another_seed_gives_other_weights(tmp_path):
    first = builtin.train_builtin(tmp_path / "a", WORLD, SHAPE, SHORT)
    second = builtin.train_builtin(tmp_path / "b", WORLD, SHAPE, {**SHORT, "seed": 1})
    assert first["weights_sha256"] != second["weights_sha256"]


def test_reaching_the_step_cap_first_fails_and_writes_nothing(tmp_path):
    settings = {**SHORT, "max_steps": 3, "eval_every": 3, "target_accuracy": 1.0}
    with pytest.raises(UserError, match=r"training 'tiny' reached its step cap \(3 steps\) with question accuracy "
                                        r"0\.\d{4}, below the target 1\.0; raise models\.tiny\.builtin\.train\.max_steps"):
        builtin.train_builtin(tmp_path / "tiny", WORLD, SHAPE, settings, name="tiny")
    assert list(tmp_path.iterdir()) == []


def test_raising_the_cap_does_not_change_the_steps_before_it(tmp_path):
    settings = {**SHORT, "max_steps": 4, "eval_every": 4}
    capped = builtin.train_builtin(tmp_path / "a", WORLD, SHAPE, settings)
    raised = builtin.train_builtin(tmp_path / "b", WORLD, SHAPE, {**settings, "max_steps": 40})  # stops at step 4
    assert capped["steps"] == raised["steps"] == 4
    assert capped["weights_sha256"] == raised["weights_sha256"]


def test_the_learning_rate_warms_up_decays_and_stays_at_its_floor():
    factor = builtin.lr_factor(100)
    steps = [factor(s) for s in range(200)]
    assert steps[0] < steps[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(steps[4:100], steps[5:100]))
    assert steps[100] == steps[199] == pytest.approx(0.1)


@pytest.mark.parametrize("config_file", ["config.yaml", "interventions.yaml"])
def test_the_default_configs_use_the_shipped_weights(tmp_path, config_file):
    config = default_config(config_file)
    shipped_default(config)
    out = tmp_path / "facts-llama"
    model = config["models"]["facts-llama"]
    stages.train_builtin_model("facts-llama", model, config["datasets"][model["builtin"]["dataset"]], out)  # a copy
    recorded = json.loads((out / "training.json").read_text())
    assert recorded["question_accuracy"] == recorded["target_accuracy"] == 1.0
    assert shipped.saved_weights_sha256(out) == recorded["weights_sha256"]
    assert recorded["spec"] == shipped.training_spec(*default_spec(config))


def test_any_other_spec_is_trained_not_shipped():
    world, shape, train = default_spec(default_config())
    assert shipped.shipped_model(shipped.training_spec(world, shape, {**train, "seed": 1})) is None
    assert shipped.shipped_model(shipped.training_spec({**world, "seed": 1}, shape, train)) is None
    assert shipped.shipped_model(shipped.training_spec(world, {**shape, "layers": 4}, train)) is None


def test_tampered_shipped_weights_are_refused(tmp_path, monkeypatch):
    tampered = tmp_path / "pretrained" / "m"
    builtin.train_builtin(tampered, WORLD, SHAPE, SHORT)
    training = json.loads((tampered / "training.json").read_text())
    (tampered / "training.json").write_text(json.dumps({**training, "weights_sha256": "0" * 64}))
    monkeypatch.setattr(shipped, "PRETRAINED", tmp_path / "pretrained")
    found = shipped.shipped_model(shipped.training_spec(WORLD, SHAPE, SHORT))
    assert found == tampered
    with pytest.raises(UserError, match="shipped weights .* have sha256"):
        shipped.install_shipped(found, tmp_path / "out")
    assert not (tmp_path / "out").exists()
