"""Build every distribution's wheel into a wheelhouse and check the packaging contract.

- PEP 420: no wheel ships `astrai/__init__.py`, and each wheel holds exactly the `astrai.<module>` packages
  DESIGN.md section 1 assigns to it.
- Versions in step: the five distributions carry one version, and every `astrai-*` requirement of one on
  another admits it (so a wheelhouse built from one commit always installs together).

    python .ci/check_wheels.py                     # build into a temporary folder, check, discard (CI)
    python .ci/check_wheels.py --wheel-dir dist    # `hatch run dist`: keep the wheelhouse in dist/

A wheelhouse installs one distribution with its AstrAI dependencies, e.g.
`pip install --find-links dist astrai-train torch==2.13.0`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from astrai.cli.version import DISTRIBUTION_MODULES

ROOT = Path(__file__).resolve().parent.parent
MODULES = {dist: set(modules) for dist, modules in DISTRIBUTION_MODULES.items()}


def build_wheels(out: Path) -> dict[str, Path]:
    """Build the five wheels into `out` (no dependencies, no build isolation: hatchling is installed here)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("astrai_*.whl"):  # a wheelhouse holds one version of each distribution
        stale.unlink()
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "--wheel-dir", str(out), *(str(ROOT / "packages" / d) for d in MODULES)], check=True)
    return {dist: next(out.glob(f"{dist.replace('-', '_')}-*.whl")) for dist in MODULES}


def check_contents(dist: str, wheel: Path) -> list[str]:
    names = zipfile.ZipFile(wheel).namelist()
    failures = [f"{wheel.name} contains astrai/__init__.py"] if "astrai/__init__.py" in names else []
    found = {n.split("/")[1] for n in names if n.startswith("astrai/") and n.count("/") >= 2}
    if found != MODULES[dist]:
        failures.append(f"{wheel.name} holds astrai.{sorted(found)}, expected astrai.{sorted(MODULES[dist])}")
    print(f"{wheel.name}: {len(names)} files, astrai.{{{', '.join(sorted(found))}}}")
    return failures


def check_versions() -> list[str]:
    projects = {d: tomllib.loads((ROOT / "packages" / d / "pyproject.toml").read_text())["project"] for d in MODULES}
    versions = {d: p["version"] for d, p in projects.items()}
    if len(set(versions.values())) != 1:
        return [f"the distributions' versions differ: {versions}; bump them together"]
    version = versions["astrai-core"]
    failures = []
    for dist, project in projects.items():
        for requirement in map(Requirement, project.get("dependencies", [])):
            if requirement.name in MODULES and not requirement.specifier.contains(version):
                failures.append(f"{dist} requires {requirement}, which excludes the current version {version}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, default=None, help="keep the wheels here (default: discard)")
    args = parser.parse_args(argv)
    failures = check_versions()
    with tempfile.TemporaryDirectory() as scratch:
        wheels = build_wheels(args.wheel_dir or Path(scratch))
        for dist, wheel in wheels.items():
            failures += check_contents(dist, wheel)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
