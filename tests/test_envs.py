"""The conda environments of the rules: every rule has one, the specs parse, the pins are the tested pins
(constraints/tested.txt, which also agree with pyproject.toml and this venv), every dependency has a floor
that CI can test (.ci/floors.py), and (where `conda` exists) the envs really build."""

import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
ENVS = sorted((REPO / "envs").glob("*.yaml"))
TESTED = REPO / "constraints" / "tested.txt"
OUTSIDE_THE_ENV = {"snakemake"}  # runs the rules from outside the env, so the env does not pin it
SELF_INSTALL = "-e ${PATCHMAP_ROOT}"  # patchmap itself; rules/common.smk sets PATCHMAP_ROOT
CONFIG = {
    "models": {"tiny": {"builtin": {"dataset": "tiny-facts", "layers": 2, "hidden": 32, "heads": 2, "mlp": 64}}},
    "datasets": {"tiny-facts": {"synthetic": {"seed": 1, "name_pool": 8, "subject_sets": 10, "orders": 2}}},
    "sites": {"subj": {"component": "resid", "positions": "subject"}},
    "runs": {"tiny": {"model": "tiny", "dataset": "tiny-facts", "sites": ["subj"], "examples": 4}},
}


def env_specs(path):
    """(conda specs, pip specs) of one environment file."""
    env = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            assert set(dep) == {"pip"}, f"{path.name}: unexpected {dep}"
            pip += dep["pip"]
        else:
            conda.append(str(dep))
    return env, conda, pip


def pinned(pip_specs):
    return {canonicalize_name(r.name): r for r in map(Requirement, (s for s in pip_specs if s != SELF_INSTALL))}


def pins_of_tested_file():
    lines = [line.split("#")[0].strip() for line in TESTED.read_text().splitlines()]
    return pinned([line for line in lines if line])


def project():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def rule_blocks():
    """{rule name: its text} for every rule in the Snakefile and rules/*.smk."""
    blocks = {}
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for match in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), re.M):
            blocks[match[1]] = match[2]
    return blocks


def test_there_are_envs():
    assert ENVS, "no envs/*.yaml"


def test_every_rule_that_runs_a_job_has_a_conda_env():
    blocks = rule_blocks()
    assert len(blocks) >= 8
    for name, text in blocks.items():
        if name == "all":  # a target only: no job runs
            continue
        env = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", text, re.M)
        assert env, f"rule {name} has no conda: env"
        assert (REPO / "rules" / env[1]).resolve() in [e.resolve() for e in ENVS], (name, env[1])


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_specs_parse(path):
    from rattler import MatchSpec

    env, conda, pip = env_specs(path)
    assert env.get("channels") and "defaults" not in env["channels"], "name channels; no implicit defaults"
    for spec in conda:
        MatchSpec(spec, strict=True)  # raises on a spec conda would not take
    for spec in pip:
        if spec != SELF_INSTALL:
            Requirement(spec)
    assert SELF_INSTALL in pip, "the env must install patchmap itself"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_are_the_tested_pins(path):
    _, _, pip = env_specs(path)
    env = {name: str(req) for name, req in pinned(pip).items()}
    tested = {name: str(req) for name, req in pins_of_tested_file().items() if name not in OUTSIDE_THE_ENV}
    assert env == tested, f"{path.name} and {TESTED.name} differ: copy the pins of {TESTED.name}"


def test_tested_pins_are_in_range_and_installed_here():
    assert_pins_match_the_install(pins_of_tested_file(), TESTED.name)


def assert_pins_match_the_install(pins, where, unpinned=()):
    """Every runtime dependency of pyproject (but `unpinned`) is pinned with ==, inside pyproject's range, at
    the version installed here, and nothing else is pinned."""
    for req in pins.values():
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{req}: pin with =="
    for dep in map(Requirement, project()["dependencies"]):
        name = canonicalize_name(dep.name)
        if name in unpinned:
            continue
        assert name in pins, f"{where} does not pin {dep.name} (pyproject: {dep})"
        version = Version(str(next(iter(pins[name].specifier)).version))
        assert dep.specifier.contains(version, prereleases=True), f"{pins[name]} is outside pyproject's {dep}"
        installed = Version(metadata.version(dep.name))
        assert installed.public == version.public, (
            f"{where} pins {pins[name]} but this install has {dep.name} {installed}: update one of them")
    extra = set(pins) - {canonicalize_name(Requirement(d).name) for d in project()["dependencies"]}
    assert not extra, f"{where} pins packages pyproject does not depend on: {sorted(extra)}"


def test_every_dependency_has_a_floor_ci_can_pin():
    """.ci/floors.py (which checks the lowest-versions CI environment) names each dependency's floor."""
    result = subprocess.run([sys.executable, str(REPO / ".ci" / "floors.py")], capture_output=True, text=True,
                            check=True)
    floors = {canonicalize_name(Requirement(line).name): Requirement(line) for line in result.stdout.split()}
    for dep in map(Requirement, project()["dependencies"]):
        req = floors[canonicalize_name(dep.name)]
        version = Version(next(iter(req.specifier)).version)
        assert dep.specifier.contains(version), f"floor {req} is outside pyproject's {dep}"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_pins_agree_with_the_python_install(path):
    from rattler import MatchSpec

    _, conda, pip = env_specs(path)
    # Python: the env's minor version is the one this venv runs, and one pyproject allows
    python = next(MatchSpec(s, strict=True) for s in conda if s.split("=")[0].strip() == "python")
    assert str(python.version).startswith(f"{sys.version_info[0]}.{sys.version_info[1]}"), python
    # every runtime dependency (but snakemake, which runs the rules from outside the env) is pinned,
    # inside pyproject's range, at the version installed here
    assert_pins_match_the_install(pinned(pip), path.name, unpinned={"snakemake"})


def test_rules_tell_pip_where_patchmap_is():
    common = (REPO / "rules" / "common.smk").read_text()
    assert "os.environ.update(PATCHMAP_ROOT=os.path.abspath(workflow.basedir))" in common


@pytest.mark.conda
@pytest.mark.skipif(shutil.which("conda") is None, reason="conda is not on PATH: cannot create the envs here")
def test_conda_creates_the_envs(tmp_path):
    """`--use-conda --conda-create-envs-only` builds each env, and patchmap imports in it from this checkout."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    prefix = tmp_path / "conda-envs"
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                             "--directory", str(tmp_path), "--cores", "1", "--use-conda",
                             "--conda-create-envs-only", "--conda-prefix", str(prefix)],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    envs = [p for p in prefix.iterdir() if p.is_dir() and (p / "conda-meta").is_dir()]
    assert len(envs) == len(ENVS), os.listdir(prefix)
    for env in envs:
        probe = subprocess.run(["conda", "run", "-p", str(env), "python", "-c",
                                "import patchmap, torch, transformers, xarray; print(patchmap.__file__)"],
                               capture_output=True, text=True, timeout=600, cwd=tmp_path)  # not from ./patchmap
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert Path(probe.stdout.strip()).resolve().is_relative_to(REPO.resolve()), probe.stdout
