"""sfplus.datamodules.images: image + prompt sources (folder, JSON, JSONL), Wan sizing, batching, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sfplus.conditioning.i2v import ImageReadError, load_image, resize_image, wan_i2v_size
from sfplus.datamodules.images import ImagePromptDataModule, ImagePromptDataset, collate_images, read_image_pairs
from sfplus.datamodules.prompts import PromptSourceError

PIL = pytest.importorskip("PIL.Image")


def write_image(path, h: int, w: int, seed: int = 0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    PIL.fromarray(rgb).save(path)
    return rgb


def folder(tmp_path, sizes=((24, 40), (24, 40), (40, 24))):
    for i, (h, w) in enumerate(sizes, 1):
        write_image(tmp_path / f"img{i}.png", h, w, seed=i)
        (tmp_path / f"img{i}.txt").write_text(f"  prompt {i}\n", encoding="utf-8")
    return tmp_path


def test_folder_pairs_in_natural_order(tmp_path):
    folder(tmp_path, [(8, 8)] * 3)
    write_image(tmp_path / "img10.png", 8, 8)
    (tmp_path / "img10.txt").write_text("prompt 10")
    (tmp_path / "notes.md").write_text("ignored")
    pairs = read_image_pairs(tmp_path)
    assert [p.image.name for p in pairs] == ["img1.png", "img2.png", "img3.png", "img10.png"]
    assert [p.prompt for p in pairs] == ["prompt 1", "prompt 2", "prompt 3", "prompt 10"]


def test_json_and_jsonl_lists_resolve_relative_paths(tmp_path):
    (tmp_path / "pics").mkdir()
    write_image(tmp_path / "pics" / "a.jpg", 8, 8)
    write_image(tmp_path / "b.png", 8, 8)
    entries = [{"image": "pics/a.jpg", "prompt": "first"}, {"image": str(tmp_path / "b.png"), "prompt": "second"}]
    (tmp_path / "list.json").write_text(json.dumps(entries))
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    for name in ("list.json", "list.jsonl"):
        pairs = read_image_pairs(tmp_path / name)
        assert [(p.image, p.prompt) for p in pairs] == [(tmp_path / "pics" / "a.jpg", "first"),
                                                        (tmp_path / "b.png", "second")]


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(PromptSourceError, match="does not exist"):
        read_image_pairs(tmp_path / "nothing")
    write_image(tmp_path / "lonely.png", 8, 8)
    with pytest.raises(PromptSourceError, match="lonely.txt"):
        read_image_pairs(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "prompt": "p"}\n{oops\n')
    with pytest.raises(PromptSourceError, match="bad.jsonl:2: not valid JSON"):
        read_image_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "gone.json").write_text(json.dumps([{"image": "missing.png", "prompt": "p"}]))
    with pytest.raises(PromptSourceError, match="missing.png"):
        read_image_pairs(tmp_path / "gone.json")
    (tmp_path / "nokey.json").write_text(json.dumps([{"img": "lonely.png", "prompt": "p"}]))
    with pytest.raises(PromptSourceError, match="nokey.json item 0.*'image' and 'prompt'"):
        read_image_pairs(tmp_path / "nokey.json")


def test_unreadable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "broken.txt").write_text("p")
    ds = ImagePromptDataset(read_image_pairs(tmp_path))
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[0]


def test_items_follow_wan_sizing(tmp_path):
    folder(tmp_path)
    area = 24 * 40
    ds = ImagePromptDataset(read_image_pairs(tmp_path), num_samples=2, max_area=area)
    assert len(ds) == 6
    item = ds[5]
    assert (item["index"], item["sample"], item["prompts"], item["text"]) == (2, 1, "prompt 3", "prompt 3")
    h, w = wan_i2v_size(40, 24, area, rounding="nearest")
    assert item["image"].shape == (3, h, w) and (h, w) == (32, 16)  # portrait image, multiples of 16
    expected = resize_image(load_image(tmp_path / "img3.png"), h, w)
    assert torch.equal(item["image"], expected)
    # 24x40 goes to 16x32 (aspect kept, multiples of 16); an image already at its Wan size keeps its pixels.
    assert ds[0]["image"].shape == (3, 16, 32)
    write_image(tmp_path / "exact.png", 16, 32)
    (tmp_path / "exact.txt").write_text("exact")
    pairs = [p for p in read_image_pairs(tmp_path) if p.image.name == "exact.png"]
    exact = ImagePromptDataset(pairs, max_area=16 * 32)[0]["image"]
    assert torch.equal(exact, load_image(tmp_path / "exact.png"))
    # rounding="wan" reproduces official Wan's float floor (480x832 at its own area -> 464x832).
    assert wan_i2v_size(480, 832, 480 * 832, rounding="wan") == (464, 832)
    assert wan_i2v_size(480, 832, 480 * 832, rounding="nearest") == (480, 832)


def test_fixed_size_covers_and_crops(tmp_path):
    folder(tmp_path)
    ds = ImagePromptDataset(read_image_pairs(tmp_path), size=(16, 16))
    imgs = [ds[i]["image"] for i in range(3)]
    assert all(im.shape == (3, 16, 16) for im in imgs)
    # 24x40 -> cover 16x16 = 16x27 (scale 2/3), then the centre 16 columns.
    src = load_image(tmp_path / "img1.png")
    ref = resize_image(src, 16, 27)[:, :, 5:21]
    assert torch.equal(imgs[0], ref)
    with pytest.raises(ValueError, match="multiples of 16"):
        ImagePromptDataset(read_image_pairs(tmp_path), size=(20, 16))


def test_collate_stacks_and_refuses_mixed_sizes(tmp_path):
    folder(tmp_path)
    ds = ImagePromptDataset(read_image_pairs(tmp_path), max_area=24 * 40)
    batch = collate_images([ds[0], ds[1]])
    assert batch["image"].shape[0] == 2 and batch["index"].tolist() == [0, 1] and batch["prompts"][1] == "prompt 2"
    with pytest.raises(ValueError, match="img3.png.*batch_size 1, or set size"):
        collate_images([ds[0], ds[2]])
    # A padding item (index -1) takes the batch's size instead of failing.
    padded = collate_images([ds[2], ds[-1]])
    assert padded["index"].tolist() == [2, -1] and padded["image"].shape[1:] == ds[2]["image"].shape


def test_datamodule_predict_covers_every_item_once_and_trains(tmp_path):
    folder(tmp_path, [(16, 16)] * 3)
    dm = ImagePromptDataModule(str(tmp_path), batch_size=2, num_samples=2, max_area=16 * 16)
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    seen = [(int(i), int(s)) for b in batches for i, s in zip(b["index"], b["sample"]) if i >= 0]
    assert sorted(seen) == [(p, s) for p in range(3) for s in range(2)]
    assert all(b["image"].shape[1:] == (3, 16, 16) for b in batches)
    train = next(iter(ImagePromptDataModule(str(tmp_path), batch_size=2, size=[16, 16]).train_dataloader()))
    assert train["image"].shape == (2, 3, 16, 16) and len(train["prompts"]) == 2
    with pytest.raises(ValueError, match="rounding"):
        ImagePromptDataModule(str(tmp_path), rounding="floor")
