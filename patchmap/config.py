"""Load and check the workflow config: JSON Schema first (with defaults filled in), then cross-references."""

import copy
import math
import re
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

from .errors import UserError
from .sites import Site

SCHEMA = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def _with_defaults(validator_class):
    """A validator that fills in each property's `default` as it validates (the jsonschema FAQ recipe)."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return validators.extend(validator_class, {"properties": properties})


def _key_path(error):
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error):
    """One line: where, what is wrong, and what is allowed."""
    if error.validator == "oneOf" and all(set(c) == {"required"} for c in error.validator_value):
        options = " or ".join("'" + "/".join(c["required"]) + "'" for c in error.validator_value)
        return f"config error at {_key_path(error)}: give exactly one of {options}"
    if error.validator == "oneOf" and error.context:
        deepest = max(error.context, key=lambda e: len(list(e.absolute_path)))
        if len(list(deepest.absolute_path)) > len(list(error.absolute_path)):
            return _describe(deepest)
        allowed = "; or ".join(c.get("description") or _short(c) for c in error.schema["oneOf"])
        return f"config error at {_key_path(error)}: {error.instance!r} is not allowed; use {allowed}"
    message = error.message
    if error.validator == "pattern":
        message += f" ({error.schema.get('description', 'wrong format')})"
    return f"config error at {_key_path(error)}: {message}"


def _short(subschema):
    if "const" in subschema:
        return repr(subschema["const"])
    if subschema.get("type") == "array":
        return f"a list of {subschema.get('items', {}).get('type', 'value')}s"
    return subschema.get("type", "another value")


def schema():
    return yaml.safe_load(SCHEMA.read_text())


def validate(config):
    """Check `config` in place against the schema, filling in defaults. Raises UserError."""
    validator = _with_defaults(Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), e.message))
    if errors:
        raise UserError(_describe(errors[0]))
    check_references(config)
    return config


def check_references(config):
    for name, model in config["models"].items():
        world = model.get("builtin", {}).get("dataset")
        if world is not None and "synthetic" not in config["datasets"].get(world, {}):
            raise UserError(f"config error at models.{name}.builtin.dataset: '{world}' is not a synthetic "
                            f"dataset; synthetic datasets: {_names(config, 'datasets', 'synthetic')}")
    for name, figure in config.get("figures", {}).items():
        for run in figure["runs"]:
            if run not in config["runs"]:
                raise UserError(f"config error at figures.{name}.runs: run '{run}' is not defined; defined runs: "
                                + ", ".join(config["runs"]))
    labels = {}
    for name, site in config["sites"].items():
        label = site.get("label", name)
        if label in labels:
            raise UserError(f"config error at sites.{name}: label '{label}' is already used by site "
                            f"'{labels[label]}'; labels name figure rows and must be unique")
        labels[label] = name
    for run_name, run in config["runs"].items():
        for key, section in (("model", "models"), ("dataset", "datasets")):
            if run[key] not in config[section]:
                raise UserError(f"config error at runs.{run_name}.{key}: '{run[key]}' is not defined; "
                                f"defined {section}: {', '.join(config[section])}")
        for site in run["sites"]:
            if site not in config["sites"]:
                raise UserError(f"config error at runs.{run_name}.sites: site '{site}' is not defined; "
                                f"defined sites: {', '.join(config['sites'])}")
        if len(set(run["sites"])) != len(run["sites"]):
            raise UserError(f"config error at runs.{run_name}.sites: a site is listed twice")
        if run.get("intervention") == "knockout":
            for site in run["sites"]:
                if config["sites"][site]["positions"] == "all":
                    raise UserError(f"config error at runs.{run_name}.sites: knockout at site '{site}' (positions "
                                    "'all') would block every token the last one attends to, which leaves its "
                                    "attention undefined; use a group that keeps some, e.g. non_subject")
        model = config["models"][run["model"]]
        if "builtin" in model and run["layers"] != "all":
            too_high = [l for l in run["layers"] if l >= model["builtin"]["layers"]]
            if too_high:
                raise UserError(f"config error at runs.{run_name}.layers: layer {too_high[0]} is out of "
                                f"range; model '{run['model']}' has layers 0 to {model['builtin']['layers'] - 1}")


def _names(config, section, kind):
    return ", ".join(n for n, d in config[section].items() if kind in d) or "none"


def load(path):
    with open(path) as fh:
        return validate(yaml.safe_load(fh))


def run_sites(config, run_name):
    return [Site.from_config(name, config["sites"][name]) for name in config["runs"][run_name]["sites"]]


def shard_count(run):
    return math.ceil(run["examples"] / run["shard_size"])


def js_base(run):
    return math.e if run["js_base"] == "e" else float(run["js_base"])


def dataset_file(config, dataset_name):
    """The dataset's file: downloaded into results/datasets/ for a url, else its path; None if synthetic."""
    dataset = config["datasets"][dataset_name]
    if "url" in dataset:
        suffix = ".jsonl" if dataset["url"].endswith(".jsonl") else ".json"
        return f"results/datasets/{dataset_name}{suffix}"
    return dataset.get("path")


def model_dir(config, model_name):
    """Where a model is loaded from: results/models/<name> for built-ins, else its path or hub id."""
    model = config["models"][model_name]
    return f"results/models/{model_name}" if "builtin" in model else model["path"]


def resolve_layers(layers, n_layers, where="layers"):
    if layers == "all":
        return list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"{where}: layer {bad[0]} is out of range; the model has layers 0 to {n_layers - 1}")
    return list(layers)


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_identity_file(model_name):
    """results/models/<name>.json: the model's weights sha256 (local) or resolved hub commit, made once."""
    return f"results/models/{model_name}.json"


def predictions_file(config, run_name):
    """The run's model's predictions on its dataset, shared by every run with the same model, dataset and dtype."""
    run = config["runs"][run_name]
    return f"results/predictions/{run['model']}/{run['dataset']}/{run['dtype']}.nc"


def predicting_run(config, model_name, dataset_name, dtype):
    """The first run (in config order) on this model, dataset and dtype: its device and batch size make
    the shared predictions."""
    return next(name for name, run in config["runs"].items()
                if (run["model"], run["dataset"], run["dtype"]) == (model_name, dataset_name, dtype))
