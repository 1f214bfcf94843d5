"""The default built-in model's shipped weights (patchmap/pretrained/): the spec each was trained from, and
their check and copy into a workflow's results. Without torch, so that the job that copies them starts in
a second (training, patchmap.builtin, needs torch)."""

import hashlib
import json
import shutil
from pathlib import Path

from .errors import UserError
from .storage import atomic_directory

PRETRAINED = Path(__file__).resolve().parent / "pretrained"


def builtin_settings(model_spec: dict, world_spec: dict) -> tuple:
    """(world, shape, train) settings of a built-in model: its config entry (`models.<name>`) and its
    world's (`datasets.<name>.synthetic`'s parent entry), both validated."""
    spec = model_spec["builtin"]
    shape = {k: spec[k] for k in ("layers", "hidden", "heads", "mlp")}
    return world_spec["synthetic"], shape, spec["train"]


def settings_from_config(config: dict, model_name: str) -> tuple:
    """builtin_settings of a built-in model in a validated config."""
    model = config["models"][model_name]
    return builtin_settings(model, config["datasets"][model["builtin"]["dataset"]])


def training_spec(world_settings: dict, model_settings: dict, train_settings: dict) -> dict:
    """Everything the trained weights follow from, as plain JSON values."""
    return json.loads(json.dumps({"world": world_settings, "shape": model_settings, "train": train_settings},
                                 sort_keys=True))


def saved_weights_sha256(model_dir) -> str:
    """sha256 of a saved model's weights: every tensor's name and raw bytes, in name order (the same as
    patchmap.builtin.weights_sha256 of the model in memory)."""
    from safetensors import safe_open
    digest = hashlib.sha256()
    with safe_open(Path(model_dir) / "model.safetensors", "numpy") as weights:
        for name in sorted(weights.keys()):
            digest.update(name.encode())
            digest.update(weights.get_tensor(name).tobytes())
    return digest.hexdigest()


def shipped_model(spec: dict):
    """The directory of the shipped weights trained from `spec` (see training_spec), or None."""
    for training in sorted(PRETRAINED.glob("*/training.json")):
        if json.loads(training.read_text()).get("spec") == spec:
            return training.parent
    return None


def install_shipped(shipped, out_dir) -> str:
    """Copy shipped weights to out_dir, after checking them against their recorded sha256."""
    recorded = json.loads((Path(shipped) / "training.json").read_text())["weights_sha256"]
    actual = saved_weights_sha256(shipped)
    if actual != recorded:
        raise UserError(f"the shipped weights in {shipped} have sha256 {actual}, but their training.json "
                        f"records {recorded}; reinstall patchmap")
    with atomic_directory(out_dir) as tmp:
        shutil.copytree(shipped, tmp, dirs_exist_ok=True)
    return recorded
