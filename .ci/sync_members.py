"""Re-install, editable and without dependencies, every AstrAI distribution this environment holds.

hatch installs workspace members when it creates an environment and does not notice later changes to their
metadata (a new `astrai` sub-command is a new entry point), so the hatch scripts run this first: about a
second, and an old environment never runs with stale metadata. The distributions to refresh are the ones
installed, so each test environment keeps exactly its own set.
"""

import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
names = sorted({d.metadata["Name"] for d in distributions() if (d.metadata["Name"] or "").startswith("astrai-")})
editable = [arg for name in names for arg in ("-e", str(ROOT / "packages" / name))]
if editable:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", *editable]
    subprocess.run(command, check=True)
