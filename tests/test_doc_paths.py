"""Every repository file a doc names exists: README.md, docs/*.md, tools/**/README.md and the header comments of
the configs. A doc that sends users to a file that is not there (as docs/wan.md once did with a patch that never
existed) fails here.

Three kinds of names are checked: relative Markdown links (against the doc's folder); paths that start at a
top-level folder of the repository (``configs/wan2.1/*.yaml``, ``tools/slurm/fit.sbatch``; globs must match
something); bare file names of the repository's kinds (``make_shards.py``, ``t2v_13b_{dmd,sid}.yaml``), which must
exist somewhere in it.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("sfplus", "callbacks", "datamodules", "configs", "tools", "tests", "docs", "assets", ".ci")
FILE_KINDS = ("py", "md", "yaml", "sbatch", "diff", "sh", "toml")
# Files that runs write, named in docs as outputs: not repository files.
RUN_OUTPUTS = {"config.yaml"}

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_BRACES = r"\{[\w.,-]*\}"  # t2v_13b_{dmd,sid}.yaml names two files
_TOPS = "|".join(map(re.escape, TOP_FOLDERS))
_REPO_PATH = re.compile(rf"(?<![\w./$-])((?:{_TOPS})/(?:[\w./*-]|{_BRACES})*(?:[\w*/]|{_BRACES}))")
_FILE_NAME = re.compile(rf"(?<![\w./$-])((?:[\w-]|{_BRACES})+\.(?:{'|'.join(FILE_KINDS)}))(?![\w.])")


@functools.cache
def documents() -> dict[Path, str]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tools").rglob("README.md"))]
    texts = {p: p.read_text() for p in docs}
    for config in sorted((ROOT / "configs").rglob("*.yaml")):
        lines = config.read_text().splitlines()
        texts[config] = "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    return texts


def expand_braces(name: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", name)
    if match is None:
        return [name]
    return [n for alt in match.group(1).split(",")
            for n in expand_braces(name[: match.start()] + alt + name[match.end():])]


@functools.cache
def repository_names() -> set[str]:
    names = set()
    for _folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") or d == ".ci"]
        subfolders[:] = [d for d in subfolders if d not in {"__pycache__", "runs", "build", "dist"}]
        names.update(files)
    return names


def missing_paths(doc: Path, text: str, names: set[str]) -> list[str]:
    missing = []
    for target in _LINK.findall(text):
        target = target.split("#")[0]
        if target and not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
            missing.append(target)
    for token in _REPO_PATH.findall(text):
        for path in expand_braces(token.rstrip("/.")):
            if not any(ROOT.glob(path)):
                missing.append(path)
    for token in _FILE_NAME.findall(text):
        missing += [n for n in expand_braces(token) if n not in names and n not in RUN_OUTPUTS]
    return list(dict.fromkeys(missing))


@pytest.mark.parametrize("doc", sorted(documents()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_doc_names_exists(doc):
    assert not missing_paths(doc, documents()[doc], repository_names())


def test_the_check_finds_what_is_missing():
    text = ("see [the patch](i2v_patch.diff), docs/i2v_patch.diff, `configs/wan2.1/*.yaml`, tools/slurm/fit.sbatch, "
            "t2v_13b_self_forcing_{dmd,nope}.yaml, make_shards.py, ghost_tool.py, https://x.org/a.py, config.yaml")
    assert missing_paths(ROOT / "docs" / "wan.md", text, repository_names()) == [
        "i2v_patch.diff", "docs/i2v_patch.diff", "t2v_13b_self_forcing_nope.yaml", "ghost_tool.py"]
