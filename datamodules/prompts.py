"""Prompt sources: a folder of ``.txt`` files (one prompt per file) or one text file with a prompt per line.

Used for data-free distillation (DMD/SiD train on prompts only) and for batch generation.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from sfplus.datamodules.samplers import EpochBatchSampler, EvenSplitSampler, WorkerStart, worker_context


class PromptSourceError(ValueError):
    """A prompt file or folder is missing, unreadable or empty."""


def read_text_file(path: Path) -> str:
    """The text of ``path``: UTF-8 (a BOM is dropped), or UTF-16 when the file starts with a UTF-16 BOM (what some
    Windows editors write); PromptSourceError if it is neither."""
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptSourceError(f"{path}: not valid UTF-8 text ({err})") from None


def read_prompts(path: str | os.PathLike, *, deduplicate: bool = False) -> list[str]:
    """Read prompts from ``path``.

    * a folder: every ``*.txt`` file (sorted by name, natural order for numbered files), whole file stripped = one
      prompt; empty files are an error (they would silently become an empty prompt);
    * a file: one prompt per non-blank line (surrounding whitespace stripped).

    ``deduplicate`` drops repeated prompts, keeping first occurrences (order preserved).
    """
    p = Path(path)
    if not p.exists():
        raise PromptSourceError(f"prompt source {p} does not exist")
    if p.is_dir():
        files = sorted(p.glob("*.txt"), key=lambda f: _natural_key(f.name))
        if not files:
            raise PromptSourceError(f"prompt folder {p} holds no .txt files")
        prompts = []
        for f in files:
            text = read_text_file(f).strip()
            if not text:
                raise PromptSourceError(f"prompt file {f} is empty")
            prompts.append(text)
    else:
        prompts = [line.strip() for line in read_text_file(p).splitlines()]
        prompts = [q for q in prompts if q]
        if not prompts:
            raise PromptSourceError(f"prompt file {p} holds no prompts (only blank lines)")
    if deduplicate:
        prompts = list(dict.fromkeys(prompts))
    return prompts


def repeated_prompts(prompts: list[str]) -> list[tuple[int, int]]:
    """``(index, index of its first occurrence)`` of every prompt that repeats an earlier one."""
    first: dict[str, int] = {}
    return [(i, first[q]) for i, q in enumerate(prompts) if first.setdefault(q, i) != i]


def _natural_key(name: str) -> list:
    return [int(s) if s.isdecimal() else s for s in re.split(r"(\d+)", name)]


class PromptDataset(Dataset):
    """``{"prompts": str, "index": int, "sample": int}`` items; ``num_samples`` items per prompt.

    Item ``i`` is prompt ``i // num_samples``, sample ``i % num_samples``. Index ``-1`` is a padding item
    (``index = -1``) that keeps ranks in step and is never written.
    """

    def __init__(self, prompts: list[str], num_samples: int = 1, extended: list[str] | None = None):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if extended is not None and len(extended) != len(prompts):
            raise PromptSourceError(f"extended prompts hold {len(extended)} lines but the prompts {len(prompts)}")
        self.prompts, self.num_samples, self.extended = prompts, num_samples, extended

    def __len__(self) -> int:
        return len(self.prompts) * self.num_samples

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            return {"prompts": self.prompts[0], "index": -1, "sample": 0, "text": self.prompts[0]}
        p, s = divmod(i, self.num_samples)
        prompt = self.prompts[p]
        # The model sees the extended prompt when there is one; the file name keeps the short one.
        model_prompt = self.extended[p] if self.extended is not None else prompt
        return {"prompts": model_prompt, "index": p, "sample": s, "text": prompt}


def collate_prompts(items: list[dict]) -> dict:
    out: dict = {"prompts": [it["prompts"] for it in items], "text": [it["text"] for it in items]}
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["sample"] = torch.tensor([it["sample"] for it in items], dtype=torch.long)
    return out


class PromptDataModule(L.LightningDataModule):
    """Prompts for data-free distillation (``fit``) and batch generation (``predict``).

    Args:
        path: a folder of ``.txt`` files or a text file with one prompt per line.
        extended_path: optional file with an extended (LLM-rewritten) prompt per line, same count as ``path``;
            the model sees the extended prompt, outputs are named after the short one.
        batch_size: prompts per batch on each rank.
        num_samples: videos per prompt when predicting.
        seed: order of training batches (a function of seed and epoch only).
        batches_per_epoch: training batches per epoch on each rank (default: one pass).
        deduplicate: drop repeated prompts.
        num_workers: DataLoader workers.
        worker_start_method: how workers start: ``forkserver`` (default; a fork of the training process can
            deadlock on its communication threads' locks), ``spawn`` or ``fork``.
    """

    def __init__(
        self,
        path: str,
        extended_path: str | None = None,
        batch_size: int = 1,
        num_samples: int = 1,
        seed: int = 0,
        batches_per_epoch: int | None = None,
        deduplicate: bool = False,
        num_workers: int = 0,
        worker_start_method: WorkerStart = "forkserver",
    ) -> None:
        super().__init__()
        self.worker_context = worker_context(num_workers, worker_start_method)
        self.path, self.extended_path = path, extended_path
        self.batch_size, self.num_samples, self.seed = batch_size, num_samples, seed
        self.batches_per_epoch, self.deduplicate, self.num_workers = batches_per_epoch, deduplicate, num_workers
        self._prompts: list[str] | None = None
        self._extended: list[str] | None = None

    def prompts(self) -> list[str]:
        if self._prompts is None:
            prompts = read_prompts(self.path)
            extended = read_prompts(self.extended_path) if self.extended_path is not None else None
            if extended is not None and len(extended) != len(prompts):
                raise PromptSourceError(
                    f"extended prompts {self.extended_path} hold {len(extended)} prompts but {self.path} holds "
                    f"{len(prompts)}: they must pair line by line"
                )
            repeats = repeated_prompts(prompts)
            if repeats and not self.deduplicate:
                later, first = repeats[0]
                rank_zero_warn(
                    f"sfplus: prompt source {self.path} holds {len(repeats)} repeated prompt(s) (prompt {later + 1} "
                    f"repeats prompt {first + 1}: {prompts[first][:60]!r}); they are kept and used again: set "
                    f"deduplicate: true to drop them"
                )
            if self.deduplicate:
                # Keep each prompt's first occurrence, and its extended line with it.
                first = dict.fromkeys(range(len(prompts)))
                seen: dict[str, int] = {}
                keep = [i for i in first if seen.setdefault(prompts[i], i) == i]
                prompts = [prompts[i] for i in keep]
                extended = [extended[i] for i in keep] if extended is not None else None
            self._prompts, self._extended = prompts, extended
        return self._prompts

    def setup(self, stage: str | None = None) -> None:
        self.prompts()

    def train_dataloader(self) -> DataLoader:
        ds = PromptDataset(self.prompts(), 1, self._extended)
        sampler = EpochBatchSampler(len(ds), self.batch_size, seed=self.seed, batches_per_epoch=self.batches_per_epoch)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=collate_prompts, num_workers=self.num_workers,
                          multiprocessing_context=self.worker_context)

    def predict_dataloader(self) -> DataLoader:
        ds = PromptDataset(self.prompts(), self.num_samples, self._extended)
        return DataLoader(
            ds, batch_sampler=EvenSplitSampler(len(ds), self.batch_size), collate_fn=collate_prompts,
            num_workers=self.num_workers, multiprocessing_context=self.worker_context,
        )
