"""Build every distribution's wheel and check the PEP 420 contract: no wheel ships `astrai/__init__.py`,
and each wheel holds exactly the `astrai.<module>` packages DESIGN.md section 1 assigns to it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    "astrai-core": {"cli", "config", "factory", "protocols"},
    "astrai-model": {"model", "tokenize", "parallel"},
    "astrai-train": {"trainer", "dataset", "serialization"},
    "astrai-infer": {"inference"},
    "astrai-serve": {"serve"},
}


def main() -> int:
    failures = []
    with tempfile.TemporaryDirectory() as out:
        for dist, expected in MODULES.items():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "wheel",
                    "--quiet",
                    "--no-deps",
                    "--wheel-dir",
                    out,
                    str(ROOT / "packages" / dist),
                ],
                check=True,
            )
            wheel = next(Path(out).glob(f"{dist.replace('-', '_')}-*.whl"))
            names = zipfile.ZipFile(wheel).namelist()
            if "astrai/__init__.py" in names:
                failures.append(f"{wheel.name} contains astrai/__init__.py")
            found = {n.split("/")[1] for n in names if n.startswith("astrai/") and n.count("/") >= 2}
            if found != expected:
                failures.append(f"{wheel.name} holds astrai.{sorted(found)}, expected astrai.{sorted(expected)}")
            print(f"{wheel.name}: {len(names)} files, astrai.{{{', '.join(sorted(found))}}}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
