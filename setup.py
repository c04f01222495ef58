"""The package list, derived from the folders; every other piece of metadata lives in pyproject.toml.

``sfplus/`` installs as ``sfplus``; the top-level ``callbacks/`` and ``datamodules/`` (kept at the top level by
design) install as ``sfplus.callbacks`` and ``sfplus.datamodules``. pyproject.toml's ``packages.find`` cannot put
a prefix on the names it finds, and a hand-written list forgets new sub-packages (a wheel once shipped without
``sfplus.modules``), so the list is found here: every folder with an ``__init__.py`` under the three roots.
``tests/test_packaging.py`` checks the built wheel against the folders.
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {"sfplus": "sfplus", "sfplus.callbacks": "callbacks", "sfplus.datamodules": "datamodules"}


def packages() -> list[str]:
    found = []
    for name, folder in PACKAGE_DIRS.items():
        found += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]
    return found


setup(packages=packages(), package_dir=PACKAGE_DIRS)
