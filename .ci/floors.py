"""The floors of pyproject.toml's direct dependencies (each one's `>=` bound), which the lowest-versions CI
environment installs (.ci/ends.sh lowest, through uv's --resolution lowest-direct). Prints them as pins;
with --check, fails unless the running Python has exactly those versions installed, so that an install
that could not reach a floor (another requirement wanting more) does not pass for a test of the floors.
A dependency without a floor stops it: every range must have a lower end that CI can test."""

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor(requirement):
    """The version a requirement's `>=` (or `==`) bound names."""
    bounds = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
    if len(bounds) != 1:
        sys.exit(f"floors: {requirement} has no single lower bound (>= or ==)")
    return bounds[0]


def floors():
    """{name: floor} of every runtime dependency."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {r.name: floor(r) for r in map(Requirement, project["dependencies"])}


def not_at_their_floor(pins):
    """'name installed (floor F)' for each dependency installed here at another version than its floor."""
    wrong = []
    for name, version in pins.items():
        installed = Version(metadata.version(name))
        if Version(installed.public) != Version(version):  # torch's CPU build 2.13.0+cpu is the floor 2.13
            wrong.append(f"{name} {installed} (floor {version})")
    return wrong


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="fail unless every dependency is installed at its floor in this Python")
    args = parser.parse_args()
    pins = floors()
    if not args.check:
        print("\n".join(f"{name}=={version}" for name, version in pins.items()))
        return
    wrong = not_at_their_floor(pins)
    if wrong:
        sys.exit("floors: not installed at the floor: " + ", ".join(wrong))
    print(f"floors: all {len(pins)} direct dependencies are installed at their floors")


if __name__ == "__main__":
    main()
