"""A real training run (``torchrun``, 2 ranks, the ``beitv2`` CLI) on a folder of odd and broken
images: it completes, names every bad file in its log, and keeps the batch count per rank."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import PIL.Image
import pytest
from toy_training import CPU_ONLY

SIZE = 40
BATCH = 5
RANKS = 2


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb as Pillow sees it)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def _photo(seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def _make_folder(root):
    """``(good, odd_but_valid, bad)`` file names written into ``root``."""
    root.mkdir()
    good = [f"{i:02d}-photo.jpg" for i in range(10)]
    for i, name in enumerate(good):
        _photo(i).save(root / name, "JPEG")
    odd = {
        "20-png-named.JPEG": lambda p: _photo(20).save(p, "PNG"),
        "21-cmyk.jpg": lambda p: _photo(21).convert("CMYK").save(p, "JPEG"),
        "22-gray.jpg": lambda p: _photo(22).convert("L").save(p, "JPEG"),
        "23-palette-alpha.png": lambda p: _photo(23).convert("P").save(p, "PNG", transparency=0),
        "24-gray16.png": lambda p: PIL.Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(p, "PNG"),
    }
    for name, write in odd.items():
        write(root / name)
    _photo(30).save(root / "30-truncated.jpg", "JPEG")
    data = (root / "30-truncated.jpg").read_bytes()
    (root / "30-truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "31-empty.jpg").write_bytes(b"")
    (root / "32-text.jpg").write_text("not an image\n")
    pixels = PIL.Image.MAX_IMAGE_PIXELS
    _png_header_only(root / "33-bomb.png", 30000, 30000)  # over 2x the limit: Pillow's error
    side = int((1.5 * pixels) ** 0.5)
    _png_header_only(root / "34-bomb-warning.png", side, side)  # between 1x and 2x: a warning, made an error
    bad = ["30-truncated.jpg", "31-empty.jpg", "32-text.jpg", "33-bomb.png", "34-bomb-warning.png"]
    return good, list(odd), bad


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_on_a_broken_folder_completes_and_names_the_bad_files(tmp_path):
    good, odd, bad = _make_folder(tmp_path / "images")
    total = len(good) + len(odd) + len(bad)
    assert total == 20  # 10 per rank, 2 batches of 5: every file is read once
    out = tmp_path / "run"
    torchrun = (
        [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    )
    command = [
        *torchrun, "--standalone", "--nproc-per-node", str(RANKS), "-m", "beitv2_fast", "train-tokenizer",
        "--model", "vqkd_encoder_tiny_decoder_1x192x3_hog", "--model-kwargs", "encoder_config={depth: 1}",
        "decoder_config={depth: 1}", "--teacher", "hog", "--input-size", "32", "--codebook-size", "16",
        "--codebook-dim", "8", "--quantize-kmeans-init", "false", "--data-dir", str(tmp_path / "images"),
        "--batch-size", str(BATCH), "--epochs", "1", "--warmup-epochs", "0", "--num-workers", "1",
        "--amp-dtype", "float32", "--log-interval", "1", "--output-dir", str(out),
    ]  # fmt: skip
    env = dict(os.environ, **CPU_ONLY, BEITV2_DIST_TIMEOUT="120")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # Every rank ran the same number of steps, bad files or not: 2 batches of 5.
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[-1]["data_skipped"] == len(bad)  # summed over the ranks: each bad file read once
    # Each bad file is named in the training log (by whichever rank read it); the odd but valid
    # ones (PNG named .JPEG, CMYK, grayscale, palette with alpha, 16-bit) are not.
    for name in bad:
        assert f"data: replaced unreadable image {tmp_path / 'images' / name}" in log, name
    for name in good + odd:
        assert f"unreadable image {tmp_path / 'images' / name}" not in log, name
    assert os.path.exists(out / "model.safetensors")
