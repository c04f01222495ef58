"""A normal (non-editable) install contains the whole library: the built wheel holds every package folder.

The editable install that the tests run from reads the checkout directly, so a package missing from the
wheel (as ``sfplus.modules`` once was) would pass every other test. ``.ci/run`` also installs the wheel into a
fresh venv and runs ``sfplus`` from outside the checkout (``make wheel-check``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Checkout folder -> the package name it installs as (setup.py's mapping).
PACKAGE_ROOTS = {"sfplus": "sfplus", "callbacks": "sfplus/callbacks", "datamodules": "sfplus/datamodules"}
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", *PACKAGE_ROOTS]


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the checkout (setuptools writes build/ and *.egg-info beside the sources)."""
    src = tmp_path / "src"
    for name in BUILD_INPUTS:
        if not (ROOT / name).exists():
            continue
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def expected_files() -> set[str]:
    """Every .py file under the package roots, as the path it has inside the wheel."""
    files = set()
    for folder, installed in PACKAGE_ROOTS.items():
        for py in (ROOT / folder).rglob("*.py"):
            if (py.parent / "__init__.py").is_file():
                files.add(f"{installed}/{py.relative_to(ROOT / folder).as_posix()}")
    return files


def test_wheel_contains_every_package_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {Path(f).parent.as_posix() for f in expected_files() if f.endswith("__init__.py")}
    assert {"sfplus", "sfplus/modules", "sfplus/nets", "sfplus/callbacks", "sfplus/datamodules"} <= packages
    missing = sorted(f for f in expected_files() if f not in names)
    assert not missing, f"not in the wheel: {missing}"
    # Nothing of the checkout's top level leaks in under its own name (no top-level callbacks/ package).
    top = {n.split("/")[0] for n in names} - {"sfplus"}
    assert len(top) == 1 and top.pop().endswith(".dist-info"), names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sfplus = sfplus.cli:main" in entry_points
