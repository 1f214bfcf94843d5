"""A job's model and tokenizer, loaded from where the model_identity stage recorded them
(results/models/{model}.json: a local folder, or a hub id pinned to the commit its revision resolved to),
with the one `loaded model` log line per job that the README's count of model loads refers to."""

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("patchmap")


def read_identity(identity_path) -> dict:
    """A model's identity record: source, revision, commit, weights_sha256, files."""
    return json.loads(Path(identity_path).read_text())


def pinned_revision(spec: dict, identity: dict):
    """The hub commit recorded by model_identity (the model is pinned to it), else the config's revision."""
    return identity["commit"] or spec.get("revision")


def load_model(spec: dict, identity_path, dtype: str, device: str):
    """The model of config entry `spec` (models.<name>) and its tokenizer, from its recorded source."""
    from . import models
    identity = read_identity(identity_path)
    started = time.perf_counter()
    model, tokenizer = models.load(identity["source"], revision=pinned_revision(spec, identity), dtype=dtype,
                                   device=device, trust_remote_code=spec.get("trust_remote_code", False),
                                   allow_pickle=spec.get("allow_pickle", False), device_map=spec.get("device_map"),
                                   max_memory=spec.get("max_memory"))
    log.info("loaded model %s in %.1f s", identity["source"], time.perf_counter() - started)
    return model, tokenizer


def load_tokenizer(spec: dict, identity_path):
    """The tokenizer of config entry `spec`, from its recorded source (no model)."""
    from . import models
    identity = read_identity(identity_path)
    return models.load_tokenizer(identity["source"], pinned_revision(spec, identity),
                                 spec.get("trust_remote_code", False))
