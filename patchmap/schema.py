"""config/schema.yaml (JSON Schema 2020-12): what a config, and the Python API's arguments, may hold. It is
the one list of allowed values (components, position groups, interventions, engines, pairings, ablation
values); the Python code reads them from here, and tests/test_layout.py checks that its tables (one entry
per intervention, engine and pairing) cover exactly these."""

import copy
import functools
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


@functools.cache
def _loaded():
    return yaml.safe_load(SCHEMA.read_text())


def schema():
    """The schema as a dict (a copy: a validator may not change the one the accessors read)."""
    return copy.deepcopy(_loaded())


def allowed(section, key):
    """The values the schema allows for `key` in each entry of `section` ("sites" or "runs")."""
    return tuple(_loaded()["properties"][section]["additionalProperties"]["properties"][key]["enum"])


def name_pattern():
    """The pattern every name of a model, dataset, site, run or figure matches (it becomes part of file
    paths), without its anchors: the workflow's wildcard constraints."""
    return _loaded()["$defs"]["name"]["pattern"].removeprefix("^").removesuffix("$")
