"""Load and check the workflow config: JSON Schema first (with defaults filled in), then cross-references."""

import copy
import math
import os
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators

from .errors import UserError
from . import tracefacts
from .interventions import from_run
from .schema import schema
from .sites import Site


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


class ConfigError(UserError):
    """A config mistake at a key path (a tuple of keys): `detail` says what is wrong and what is allowed."""

    def __init__(self, path, detail):
        self.path, self.detail = tuple(str(p) for p in path), detail
        super().__init__(f"config error at {'.'.join(self.path) or '(top level)'}: {detail}")


def _describe(error):
    """The error's key path and one line on what is wrong there, and what is allowed."""
    path = tuple(error.absolute_path)
    if error.validator in ("oneOf", "anyOf") and all(set(c) == {"required"} for c in error.validator_value):
        options = " or ".join("'" + "/".join(c["required"]) + "'" for c in error.validator_value)
        return path, f"give exactly one of {options}" if error.validator == "oneOf" else f"give {options}"
    if error.validator == "oneOf" and error.context:
        deepest = max(error.context, key=lambda e: len(list(e.absolute_path)))
        if len(list(deepest.absolute_path)) > len(list(error.absolute_path)):
            return _describe(deepest)
        # the option whose type fits but whose constraint failed (e.g. a list of layers with one twice)
        fitting = [e for e in error.context if e.validator not in ("const", "type", "enum")]
        if fitting:
            return _describe(fitting[0])
        allowed = "; or ".join(c.get("description") or _short(c) for c in error.schema["oneOf"])
        return path, f"{error.instance!r} is not allowed; use {allowed}"
    if error.validator == "uniqueItems":
        twice = next(x for i, x in enumerate(error.instance) if x in error.instance[:i])
        what = {"layers": "layer ", "sites": "site "}.get(str(path[-1]) if path else "", "")
        return path, f"{what}{twice!r} is listed twice"
    message = error.message
    if error.validator == "pattern":
        message += f" ({error.schema.get('description', 'wrong format')})"
    return path, message


def _short(subschema):
    if "const" in subschema:
        return repr(subschema["const"])
    if subschema.get("type") == "array":
        return f"a list of {subschema.get('items', {}).get('type', 'value')}s"
    return subschema.get("type", "another value")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise UserError(f"{self.name}: line {key_node.start_mark.line + 1}: key '{key}' is defined twice "
                                "in the same mapping; the first definition would be lost")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path):
    """A YAML file's content, refusing duplicate keys; a syntax error is one line too."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read: {e}") from None


def validate(config):
    """Check `config` in place against the schema, filling in defaults. Raises ConfigError."""
    validator = _with_defaults(Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(list(e.absolute_path)), e.message))
    if errors:
        raise ConfigError(*_describe(errors[0]))
    check_references(config)
    return config


def validate_trace(spec):
    """Check one `traces` entry in place (the Python API's arguments) against the schema's, filling in
    defaults, and its facts (tracefacts.problems). Raises ConfigError, its path from the entry."""
    root = schema()
    validator = _with_defaults(Draft202012Validator)(root).evolve(
        schema=root["properties"]["traces"]["additionalProperties"])
    errors = sorted(validator.iter_errors(spec), key=lambda e: (len(list(e.absolute_path)), e.message))
    if errors:
        raise ConfigError(*_describe(errors[0]))
    for index, problem in tracefacts.problems(spec):
        raise ConfigError(("facts", index), problem)
    return spec


SHARED_FOLDERS = ("models", "datasets", "predictions", "figures", "traces", "README.md")
"""What results/ holds besides the runs' folders: no run may take one of these names."""


MODEL_FOLDERS = ("logs", "benchmarks")
"""What results/models/ holds besides the built-in models' folders."""


def check_run_names(config):
    for name, model in config["models"].items():
        if "builtin" in model and name.lower() in MODEL_FOLDERS:
            raise ConfigError(("models", name), f"the model name '{name}' is taken by results/models/{name}, which "
                              f"holds the models' {name}; rename the model")
    for name in config["runs"]:
        if name.lower() in (f.lower() for f in SHARED_FOLDERS):
            raise ConfigError(("runs", name), f"the run name '{name}' is taken by results/{name}, which "
                              f"holds every run's shared files ({', '.join(SHARED_FOLDERS)} are reserved); "
                              "rename the run")


def check_references(config):
    check_run_names(config)
    check_traces(config)
    for name, model in config["models"].items():
        world = model.get("builtin", {}).get("dataset")
        if world is not None and "synthetic" not in config["datasets"].get(world, {}):
            raise ConfigError(("models", name, "builtin", "dataset"), f"'{world}' is not a synthetic dataset; "
                              f"synthetic datasets: {_names(config, 'datasets', 'synthetic')}")
    for name, figure in config.get("figures", {}).items():
        for run in figure["runs"]:
            if run not in config["runs"]:
                raise ConfigError(("figures", name, "runs"), f"run '{run}' is not defined; defined runs: "
                                  + ", ".join(config["runs"]))
            if run not in runs_with_site_rows(config):
                raise ConfigError(("figures", name, "runs"), f"run '{run}' has head sites only; figures show "
                                  f"site x layer heatmaps (its head heatmaps are in results/{run}/heatmap.png)")
    labels = {}
    for name, site in config["sites"].items():
        label = site.get("label", name)
        if label in labels:
            raise ConfigError(("sites", name), f"label '{label}' is already used by site "
                              f"'{labels[label]}'; labels name figure rows and must be unique")
        labels[label] = name
    for run_name, run in config["runs"].items():
        for key, section in (("model", "models"), ("dataset", "datasets")):
            if run[key] not in config[section]:
                raise ConfigError(("runs", run_name, key), f"'{run[key]}' is not defined; "
                                  f"defined {section}: {', '.join(config[section])}")
        for site in run["sites"]:
            if site not in config["sites"]:
                raise ConfigError(("runs", run_name, "sites"), f"site '{site}' is not defined; "
                                  f"defined sites: {', '.join(config['sites'])}")
        twice = [s for i, s in enumerate(run["sites"]) if s in run["sites"][:i]]
        if twice:
            raise ConfigError(("runs", run_name, "sites"), f"site '{twice[0]}' is listed twice")
        for site in run["sites"]:
            spec = config["sites"][site]
            problem = from_run(run).site_problem(site, spec["positions"], spec["component"])
            if problem:
                raise ConfigError(("runs", run_name, "sites"), problem)
        model = config["models"][run["model"]]
        if "builtin" in model and run["layers"] != "all":
            too_high = [l for l in run["layers"] if l >= model["builtin"]["layers"]]
            if too_high:
                raise ConfigError(("runs", run_name, "layers"), f"layer {too_high[0]} is out of range; model "
                                  f"'{run['model']}' has layers 0 to {model['builtin']['layers'] - 1}")


def check_traces(config):
    """Each trace's model and dataset are defined, and its facts make sense (tracefacts.problems)."""
    for name, spec in config.get("traces", {}).items():
        for key, section in (("model", "models"), ("dataset", "datasets")):
            if key in spec and spec[key] not in config[section]:
                raise ConfigError(("traces", name, key), f"'{spec[key]}' is not defined; "
                                  f"defined {section}: {', '.join(config[section])}")
        for index, problem in tracefacts.problems(spec):
            raise ConfigError(("traces", name, "facts", index), problem)


def _names(config, section, kind):
    return ", ".join(n for n, d in config[section].items() if kind in d) or "none"


def load(path):
    return validate(load_yaml(path))


def check_dataset_files(config):
    """Every `path:` dataset that a run uses exists and is not a folder (checked when the workflow starts,
    before Snakemake looks for its inputs and reports a missing one in its own words)."""
    for name in dict.fromkeys(run["dataset"] for run in config["runs"].values()):
        if "path" not in config["datasets"][name]:
            continue
        path = os.path.expanduser(config["datasets"][name]["path"])
        if Path(path).is_dir():
            raise UserError(f"dataset path '{path}' is a folder (datasets.{name}.path); give the dataset file")
        if not Path(path).exists():
            raise UserError(f"dataset file '{path}' does not exist (datasets.{name}.path)")


def runs_with_site_rows(config):
    """The runs with a site without heads, a row of the site x layer heatmap: these have a lines plot and
    may be drawn in figures (a head site's results are head x layer)."""
    return [name for name, run in config["runs"].items()
            if any(config["sites"][site]["component"] != "head" for site in run["sites"] if site in config["sites"])]


def run_sites(config, run_name):
    return [Site.from_config(name, config["sites"][name]) for name in config["runs"][run_name]["sites"]]


def js_base(run):
    return math.e if run["js_base"] == "e" else float(run["js_base"])


def resolve_layers(layers, n_layers, where="layers"):
    if layers == "all":
        return list(range(n_layers))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"{where}: layer {bad[0]} is out of range; the model has layers 0 to {n_layers - 1}")
    return list(layers)


def predicting_run(config, model_name, dataset_name, dtype):
    """The first run (in config order) on this model, dataset and dtype: its device and batch size make
    the shared predictions."""
    return next(name for name, run in config["runs"].items()
                if (run["model"], run["dataset"], run["dtype"]) == (model_name, dataset_name, dtype))
