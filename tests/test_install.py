"""One distribution installs alone from the wheelhouse, as its README says, in a fresh virtual environment.

`hatch run dist` builds the wheelhouse (`.ci/check_wheels.py --wheel-dir dist`); a user then runs
`pip install --find-links dist astrai-<name> torch==2.13.0`. Each case installs into a new venv (no access to
this environment's packages) and checks what the distribution brings: its modules and `astrai` sub-commands,
its AstrAI dependencies and nothing more.
"""

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # each case installs torch and the third-party dependencies into a new venv

CASES = {
    # distribution: (AstrAI distributions it brings, commands it adds, its module, a module it must not bring)
    "astrai-infer": (
        {"astrai-core", "astrai-model", "astrai-infer"},
        {"generate", "eval", "bench"},
        "astrai.inference",
        "astrai.trainer",
    ),
    "astrai-train": (
        {"astrai-core", "astrai-model", "astrai-train"},
        {"train", "data", "demo"},
        "astrai.trainer",
        "astrai.inference",
    ),
}


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, str(ROOT / ".ci" / "check_wheels.py"), "--wheel-dir", str(out)], check=True)
    return out


def _run(*command: str | Path) -> str:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("dist", sorted(CASES))
def test_installs_alone_from_the_wheelhouse(dist, wheelhouse, tmp_path):
    brings, commands, module, absent = CASES[dist]
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    _run(bin_dir / "python", "-m", "pip", "install", "--quiet", "--find-links", wheelhouse, dist, "torch==2.13.0")

    installed = {line.split()[0] for line in _run(bin_dir / "astrai", "version").splitlines()} - {"python"}
    assert installed == brings
    help_text = _run(bin_dir / "astrai", "--help")
    assert all(f"    {command} " in help_text for command in commands), help_text
    _run(bin_dir / "python", "-c", f"import {module}")
    missing = subprocess.run([bin_dir / "python", "-c", f"import {absent}"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named" in missing.stderr
