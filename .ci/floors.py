"""Print pip constraints that pin every direct dependency of pyproject.toml at its floor (the `>=` bound),
for the lowest-versions CI environment (.ci/ends.sh). `--torch SPEC` replaces torch's floor (CI takes the
build on this machine's disk); `--extra NAME` adds that extra's requirements (their floors too, or their
`==` pins). A dependency without a floor stops it: every range must have a lower end that CI can test."""

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor(requirement):
    """The version a requirement's `>=` (or `==`) bound names."""
    bounds = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
    if len(bounds) != 1:
        sys.exit(f"floors: {requirement} has no single lower bound (>= or ==)")
    return bounds[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--torch", help="the torch requirement to use instead of torch's floor")
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependency group to add")
    args = parser.parse_args()
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in args.extra:
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for requirement in requirements:
        if requirement.name == "torch" and args.torch:
            print(args.torch)
        else:
            print(f"{requirement.name}=={floor(requirement)}")


if __name__ == "__main__":
    main()
