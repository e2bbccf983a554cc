"""The five distributions share the PEP 420 `astrai` namespace and one `astrai` command."""

import subprocess
import sys
from pathlib import Path

import astrai

DISTRIBUTIONS = ("astrai-core", "astrai-model", "astrai-train", "astrai-infer", "astrai-serve")


def test_namespace_has_five_portions_and_no_init():
    portions = {Path(p).parent.parent.name for p in astrai.__path__}
    assert portions == set(DISTRIBUTIONS)
    assert astrai.__file__ is None


def test_version_lists_every_distribution():
    proc = subprocess.run([sys.executable, "-m", "astrai.cli", "version"], capture_output=True, text=True, check=True)
    listed = {line.split()[0] for line in proc.stdout.splitlines()}
    assert set(DISTRIBUTIONS) <= listed
