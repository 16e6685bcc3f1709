"""Datasets: folder layouts, the offline demo set, and bad image files (reliability D1-D5)."""

import socket
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from beitv2_fast.data import datasets
from beitv2_fast.data.datasets import (
    BadImageWarning,
    DemoImages,
    FlatImageDataset,
    ImageFolderDataset,
    build_dataset,
    decode_image,
)


def _save(path, mode="RGB", size=(32, 24), color=(200, 30, 60), **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = PIL.Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, **kwargs)
    return path


def test_image_folder_layout(tmp_path):
    _save(tmp_path / "zebra" / "b.jpg")
    _save(tmp_path / "zebra" / "a.PNG", format="PNG")
    _save(tmp_path / "ant" / "nested" / "c.jpeg", format="JPEG")
    _save(tmp_path / "ant" / ".hidden.jpg", format="JPEG")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["ant", "zebra"] and dataset.num_classes == 2
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in dataset.samples] == [
        ("ant/nested/c.jpeg", 0),
        ("zebra/a.PNG", 1),
        ("zebra/b.jpg", 1),
    ]
    image, label = dataset[2]
    assert image.mode == "RGB" and image.size == (32, 24) and label == 1
    with pytest.raises(FileNotFoundError, match="FlatImageDataset"):
        ImageFolderDataset(tmp_path / "ant" / "nested")


def test_flat_folder_and_build_dataset(tmp_path):
    for i in range(3):
        _save(tmp_path / "flat" / f"{i}.jpg")
    flat = build_dataset(tmp_path / "flat")
    assert isinstance(flat, FlatImageDataset) and len(flat) == 3 and flat[0][1] == -1
    _save(tmp_path / "imagenet" / "train" / "n01" / "x.JPEG")
    _save(tmp_path / "imagenet" / "val" / "n01" / "y.JPEG")
    train = build_dataset(tmp_path / "imagenet", "train")
    assert isinstance(train, ImageFolderDataset) and train.samples[0][0].endswith("x.JPEG")
    assert build_dataset(tmp_path / "imagenet", "val").samples[0][0].endswith("y.JPEG")
    with pytest.raises(FileNotFoundError):
        build_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        FlatImageDataset(tmp_path / "empty")


def test_demo_set_builds_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the demo set must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    datasets.demo_photo.cache_clear()
    train, val = DemoImages("train"), DemoImages("val", crops_per_photo=2)
    assert len(train) == 32 * len(datasets.DEMO_PHOTOS) and train.num_classes == len(datasets.DEMO_PHOTOS)
    assert np.bincount(train.labels).tolist() == [32] * train.num_classes
    assert train.images.shape[1:] == (128, 128, 3) and train.images.dtype == np.uint8
    image, label = train[5]
    assert image.mode == "RGB" and image.size == (128, 128) and label == 0
    assert len(val) == 2 * train.num_classes
    assert not np.array_equal(val.images[0], train.images[0])
    assert np.array_equal(DemoImages("val", crops_per_photo=2).images, val.images)  # deterministic
    assert build_dataset("demo", "val", crops_per_photo=1).split == "val"
    # Crops of one photograph resemble each other more than crops of another (a learnable task).
    means = train.images.reshape(train.num_classes, 32, -1).mean(2)
    assert (means.std(1).mean()) < means.mean(1).std()
    with pytest.raises(ValueError, match="split"):
        DemoImages("test")


def test_demo_set_saves_an_image_folder(tmp_path):
    demo = DemoImages("val", crops_per_photo=1, photos=("coffee", "camera"), crop_size=32)
    folder = ImageFolderDataset(demo.save_image_folder(tmp_path))
    assert folder.classes == sorted(["coffee", "camera"]) and len(folder) == 2
    image, label = folder[folder.class_to_idx["coffee"]]
    assert np.abs(np.asarray(image, dtype=int) - demo.images[0]).mean() < 8  # JPEG q95, 4:2:0 chroma at 32 px
    assert np.abs(np.asarray(image, dtype=int) - demo.images[1]).mean() > 30


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    """A folder with every kind of awkward file, ImageNet's among them, in sorted order."""
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)  # so that small files can be bombs
    root = tmp_path / "data" / "class"
    _save(root / "00_good.JPEG", size=(32, 24))
    good_bytes = (root / "00_good.JPEG").read_bytes()
    (root / "01_truncated.JPEG").write_bytes(good_bytes[: len(good_bytes) // 2])
    _save(root / "02_png_named.JPEG", format="PNG", color=(10, 200, 10))
    _save(root / "03_cmyk.JPEG", mode="CMYK", color=(20, 40, 220), format="JPEG", quality=95)
    _save(root / "04_gray.JPEG", mode="L", color=(128, 128, 128), format="JPEG")
    (root / "05_empty.JPEG").write_bytes(b"")
    _save(root / "06_bomb_warning.png", size=(48, 48), format="PNG")  # 2304 px > 2000
    _save(root / "07_bomb_error.png", size=(70, 70), format="PNG")  # 4900 px > 2 * 2000
    palette = PIL.Image.new("P", (20, 20), 3)
    palette.info["transparency"] = 3
    palette.save(root / "08_palette_alpha.png")
    PIL.Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(root / "09_gray16.png")
    (root / "10_text.jpg").write_text("definitely not a JPEG")
    _save(root / "11_good.JPEG", color=(1, 2, 3))
    return tmp_path / "data"


BAD = {"01_truncated.JPEG", "05_empty.JPEG", "06_bomb_warning.png", "07_bomb_error.png", "10_text.jpg"}


def test_bad_files_are_converted_or_replaced(bad_folder):
    dataset = ImageFolderDataset(bad_folder)
    names = [p.rsplit("/", 1)[-1] for p, _ in dataset.samples]
    assert len(dataset) == 12
    with pytest.warns(BadImageWarning) as caught:
        loaded = [dataset.load(i)[0] for i in range(len(dataset))]
    assert len(loaded) == len(dataset)  # the length never changes
    assert all(image.mode == "RGB" for image in loaded)
    skipped = dataset.pop_skipped()
    assert sorted(s.path.rsplit("/", 1)[-1] for s in skipped) == sorted(BAD)
    assert len(caught) == len(BAD) and dataset.pop_skipped() == []
    # A bad file's sample is the next valid one, deterministically.
    pixels = {name: np.asarray(image) for name, image in zip(names, loaded, strict=True)}
    assert np.array_equal(pixels["01_truncated.JPEG"], pixels["02_png_named.JPEG"])
    assert np.array_equal(pixels["05_empty.JPEG"], pixels["08_palette_alpha.png"])
    assert np.array_equal(pixels["10_text.jpg"], pixels["11_good.JPEG"])
    # Conversions keep the colours.
    assert np.abs(pixels["02_png_named.JPEG"][0, 0].astype(int) - (10, 200, 10)).max() <= 1
    assert np.abs(pixels["03_cmyk.JPEG"].reshape(-1, 3).mean(0) - (20, 40, 220)).max() < 8
    gray = pixels["04_gray.JPEG"]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and abs(int(gray[0, 0, 0]) - 128) <= 2
    assert abs(int(pixels["09_gray16.png"][0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_bad_file_errors_are_the_expected_kinds(bad_folder):
    root = bad_folder / "class"
    for name, error in [
        ("01_truncated.JPEG", OSError),
        ("05_empty.JPEG", PIL.UnidentifiedImageError),
        ("06_bomb_warning.png", PIL.Image.DecompressionBombWarning),
        ("07_bomb_error.png", PIL.Image.DecompressionBombError),
    ]:
        with pytest.raises(error):
            decode_image(root / name)


def test_too_many_bad_files_in_a_row_raise(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8 broken")
    dataset = FlatImageDataset(tmp_path, max_consecutive_failures=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(RuntimeError, match="4 unreadable images in a row"):
            dataset[0]
    assert len(dataset.pop_skipped()) == 1


def test_index_out_of_range(tmp_path):
    _save(tmp_path / "a.jpg")
    with pytest.raises(IndexError):
        FlatImageDataset(tmp_path)[1]
