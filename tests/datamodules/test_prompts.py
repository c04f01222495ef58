"""sfplus.datamodules.prompts: reading prompt folders/files robustly, the dataset and the DataModule."""

import pytest
import torch

from sfplus.datamodules.prompts import (
    PromptDataModule,
    PromptDataset,
    PromptSourceError,
    collate_prompts,
    read_prompts,
)


# ---- folders ---------------------------------------------------------------------------------------------
def test_folder_natural_order_and_strip(tmp_path):
    for name, text in [("10.txt", "ten"), ("2.txt", "  two\n"), ("1.txt", "one\nsecond line\n"), ("notes.md", "x")]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    # One prompt per file (multi-line content kept whole), natural order 1, 2, 10; non-.txt files ignored.
    assert read_prompts(tmp_path) == ["one\nsecond line", "two", "ten"]


def test_folder_natural_order_with_prefixes(tmp_path):
    for i in [3, 1, 20, 100, 2]:
        (tmp_path / f"prompt_{i}.txt").write_text(f"p{i}", encoding="utf-8")
    assert read_prompts(str(tmp_path)) == ["p1", "p2", "p3", "p20", "p100"]


def test_folder_with_unicode_digit_names(tmp_path):
    # '²' is a digit for str.isdigit() but not for the regex \d: sorting must not crash.
    (tmp_path / "1²2.txt").write_text("sup", encoding="utf-8")
    (tmp_path / "3.txt").write_text("three", encoding="utf-8")
    assert sorted(read_prompts(tmp_path)) == ["sup", "three"]


def test_empty_folder_errors(tmp_path):
    (tmp_path / "readme.md").write_text("no prompts here")
    with pytest.raises(PromptSourceError, match=str(tmp_path)):
        read_prompts(tmp_path)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_folder_with_empty_file_errors(tmp_path, content):
    (tmp_path / "1.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "2.txt").write_text(content, encoding="utf-8")
    with pytest.raises(PromptSourceError, match="2.txt"):
        read_prompts(tmp_path)


# ---- single files ----------------------------------------------------------------------------------------
def test_file_with_blank_lines_and_crlf(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"first prompt\r\n\r\n   \r\n  second prompt  \r\n\nthird\n\n")
    assert read_prompts(f) == ["first prompt", "second prompt", "third"]


def test_utf8_bom(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_text("caf\u00e9 scene\nnext\n", encoding="utf-8-sig")
    assert f.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_prompts(f) == ["caf\u00e9 scene", "next"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_with_bom(tmp_path, encoding):
    f = tmp_path / "u16.txt"
    text = "\u732b\u304c\u8d70\u308b \U0001F408\r\nsecond \u00e9\r\n"
    bom = {"utf-16": b"", "utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}[encoding]
    f.write_bytes(bom + text.encode(encoding))
    assert read_prompts(f) == ["\u732b\u304c\u8d70\u308b \U0001F408", "second \u00e9"]


def test_emoji_utf8(tmp_path):
    f = tmp_path / "emoji.txt"
    family = "\U0001F468\u200d\U0001F469\u200d\U0001F467"
    f.write_text(f"a cat \U0001F431 on a \U0001F6F9\n{family} family\n", encoding="utf-8")
    assert read_prompts(f) == ["a cat \U0001F431 on a \U0001F6F9", "\U0001F468\u200d\U0001F469\u200d\U0001F467 family"]


def test_deduplicate_keeps_first_occurrences(tmp_path):
    f = tmp_path / "dup.txt"
    f.write_text("b\na\nb\n  a \nc\n", encoding="utf-8")
    assert read_prompts(f) == ["b", "a", "b", "a", "c"]
    assert read_prompts(f, deduplicate=True) == ["b", "a", "c"]


def test_missing_path_errors(tmp_path):
    missing = tmp_path / "nope" / "prompts.txt"
    with pytest.raises(PromptSourceError, match="nope"):
        read_prompts(missing)
    assert issubclass(PromptSourceError, ValueError)


@pytest.mark.parametrize("content", [b"", b"\n\n   \n\t\n", b"\xef\xbb\xbf\n"])
def test_empty_or_blank_file_errors(tmp_path, content):
    f = tmp_path / "blank.txt"
    f.write_bytes(content)
    with pytest.raises(PromptSourceError, match="blank.txt"):
        read_prompts(f)


def test_invalid_utf8_errors_naming_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptSourceError, match="latin1.txt"):
        read_prompts(f)


# ---- dataset / datamodule --------------------------------------------------------------------------------
def test_dataset_num_samples():
    ds = PromptDataset(["a", "b", "c"], num_samples=2)
    assert len(ds) == 6
    items = [ds[i] for i in range(6)]
    assert [(it["prompts"], it["index"], it["sample"]) for it in items] == [
        ("a", 0, 0), ("a", 0, 1), ("b", 1, 0), ("b", 1, 1), ("c", 2, 0), ("c", 2, 1)
    ]
    assert ds[-1]["index"] == -1  # padding item
    with pytest.raises(ValueError):
        PromptDataset(["a"], num_samples=0)


def test_dataset_extended_prompts():
    ds = PromptDataset(["a", "b"], 1, extended=["long a", "long b"])
    assert ds[1]["prompts"] == "long b" and ds[1]["text"] == "b"
    with pytest.raises(PromptSourceError, match="3"):
        PromptDataset(["a", "b"], 1, extended=["x", "y", "z"])


def test_collate():
    ds = PromptDataset(["a", "b"], 2)
    batch = collate_prompts([ds[3], ds[0], ds[-1]])
    assert batch["prompts"] == ["b", "a", "a"]
    assert torch.equal(batch["index"], torch.tensor([1, 0, -1]))
    assert torch.equal(batch["sample"], torch.tensor([1, 0, 0]))


def test_datamodule_extended_mismatch(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("long a\n", encoding="utf-8")
    dm = PromptDataModule(str(tmp_path / "p.txt"), extended_path=str(tmp_path / "e.txt"))
    # Caught at setup, naming both files.
    with pytest.raises(PromptSourceError, match=r"e\.txt hold 1 prompts but .*p\.txt holds 2"):
        dm.setup("fit")


def test_datamodule_predict_covers_every_sample(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("long a\nlong b\nlong c\n", encoding="utf-8")
    dm = PromptDataModule(str(tmp_path / "p.txt"), extended_path=str(tmp_path / "e.txt"), batch_size=2, num_samples=2)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    seen = [(p, t, int(i), int(s))
            for b in batches for p, t, i, s in zip(b["prompts"], b["text"], b["index"], b["sample"])]
    assert sorted(seen) == [
        ("long a", "a", 0, 0), ("long a", "a", 0, 1), ("long b", "b", 1, 0), ("long b", "b", 1, 1),
        ("long c", "c", 2, 0), ("long c", "c", 2, 1),
    ]


def test_datamodule_train_batches(tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(6)), encoding="utf-8")
    dm = PromptDataModule(str(tmp_path / "p.txt"), batch_size=2, seed=3)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and all(len(b["prompts"]) == 2 for b in batches)
    assert sorted(p for b in batches for p in b["prompts"]) == [f"prompt {i}" for i in range(6)]


def test_datamodule_deduplicate_with_extended(tmp_path):
    # Deduplicating the prompts must drop the matching extended lines too (pairs stay aligned).
    (tmp_path / "p.txt").write_text("a\nb\na\n", encoding="utf-8")
    (tmp_path / "e.txt").write_text("long a\nlong b\nlong a again\n", encoding="utf-8")
    dm = PromptDataModule(str(tmp_path / "p.txt"), extended_path=str(tmp_path / "e.txt"), deduplicate=True)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    pairs = sorted((t, p) for b in batches for t, p in zip(b["text"], b["prompts"]))
    assert pairs == [("a", "long a"), ("b", "long b")]
