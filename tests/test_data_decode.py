"""Decoding of real images and masks in every supported format, and DICOM written from a real image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import write_dicom

from usagg.data.decode import decode_image, image_size, read_image, read_mask
from usagg.errors import DataError

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def hc18_image(shared_data) -> Path:
    return shared_data / "hc18_fetal_head" / "images" / "010_2HC.png"


def _grey(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("L"))


def test_grey_png_replicated_to_rgb(hc18_image):
    pixels, spacing = read_image(hc18_image)
    original = _grey(hc18_image)
    assert pixels.shape == (*original.shape, 3)
    assert pixels.dtype == np.uint8
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], original)
    assert spacing is None


def test_16bit_png_scaled_to_8bit(hc18_image, tmp_path):
    original = _grey(hc18_image).astype(np.uint16)
    full = tmp_path / "full16.png"
    Image.fromarray(original * 257).save(full)  # 8-bit values spread over the 16-bit range
    assert Image.open(full).mode.startswith("I")
    assert np.abs(decode_image(full).pixels.astype(int) - original).max() <= 1
    twelve = tmp_path / "twelve_bit.png"
    Image.fromarray((original * 16).astype(np.uint16)).save(twelve)  # 12-bit data in a 16-bit file
    assert np.abs(decode_image(twelve).pixels.astype(int) - original).max() <= 1


def test_rgb_png_kept(shared_data):
    rgb_files = [p for p in sorted((shared_data / "usgra_nerve_vessel" / "images").glob("*.png")) if Image.open(p).mode == "RGB"]
    assert rgb_files, "the USGRA subset has RGB images"
    pixels, _ = read_image(rgb_files[0])
    assert np.array_equal(pixels, np.array(Image.open(rgb_files[0])))


def test_jpeg_and_bmp(hc18_image, tmp_path):
    original = _grey(hc18_image)
    Image.fromarray(original).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(original).save(tmp_path / "a.bmp")
    assert np.array_equal(decode_image(tmp_path / "a.bmp").pixels, original)
    jpeg = decode_image(tmp_path / "a.jpg").pixels.astype(int)
    assert jpeg.shape == original.shape
    assert np.abs(jpeg - original).mean() < 3


def test_palette_mask_gives_indices(shared_data):
    path = shared_data / "usgra_nerve_vessel" / "masks" / "0000.png"
    assert Image.open(path).mode == "P"
    mask = read_mask(path)
    assert mask.dtype == np.int64
    assert set(np.unique(mask).tolist()) == {0, 1, 2}
    assert np.array_equal(mask, np.array(Image.open(path)))


def test_one_bit_mask(shared_data):
    path = shared_data / "busbra_breast" / "masks" / "mask_0001-l.png"
    assert Image.open(path).mode == "1"
    mask = read_mask(path)
    assert set(np.unique(mask).tolist()) == {0, 1}


def test_binary_255_mask(shared_data):
    path = shared_data / "hc18_fetal_head" / "masks" / "010_2HC.png"
    raw = np.array(Image.open(path))
    assert set(np.unique(raw).tolist()) == {0, 255}
    mask = read_mask(path)
    assert np.array_equal(mask, (raw == 255).astype(np.int64))


def test_colour_mask_rejected(tmp_path):
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[2:4, 2:4] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match="colour mask"):
        read_mask(tmp_path / "colour.png")


def test_dicom_pixels_and_spacing(hc18_image, tmp_path):
    original = _grey(hc18_image)
    path = write_dicom(tmp_path / "head.dcm", original, PixelSpacing=[0.0799, 0.0799])
    decoded = decode_image(path)
    assert np.array_equal(decoded.pixels, original)
    assert decoded.spacing_mm_per_px == pytest.approx(0.0799)
    assert image_size(path) == original.shape


def test_dicom_monochrome1_inverted(hc18_image, tmp_path):
    original = _grey(hc18_image)
    path = write_dicom(tmp_path / "inv.dcm", original, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(decode_image(path).pixels, 255 - original)


def test_dicom_ultrasound_region_spacing(hc18_image, tmp_path):
    from pydicom.dataset import Dataset

    region = Dataset()
    region.PhysicalUnitsXDirection = 3  # cm
    region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = 0.012
    region.PhysicalDeltaY = 0.012
    path = write_dicom(tmp_path / "region.dcm", _grey(hc18_image), SequenceOfUltrasoundRegions=[region])
    assert decode_image(path).spacing_mm_per_px == pytest.approx(0.12)


def test_dicom_multiframe_rejected(hc18_image, tmp_path):
    path = write_dicom(tmp_path / "cine.dcm", _grey(hc18_image), NumberOfFrames=2)
    with pytest.raises(DataError, match="single-frame"):
        decode_image(path)


def test_undecodable_image_names_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        decode_image(path)


def test_missing_image_names_file(tmp_path):
    with pytest.raises(DataError, match="missing.png: image file not found"):
        read_image(tmp_path / "missing.png")
