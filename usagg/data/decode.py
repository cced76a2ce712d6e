"""Image and mask decoding: PNG (1-, 8-, 16-bit, palette, RGB), JPEG, BMP, TIFF and single-frame DICOM.

Rules (also in docs/data.md):
- Images become uint8. Greyscale stays one channel in ``decode_image`` and is replicated to three channels by
  ``read_image`` (the backbone takes RGB). 1-bit images map to 0/255.
- Greyscale deeper than 8 bits is scaled by ``255 / (2**bits - 1)``, where ``bits`` is the smallest of 8, 10, 12,
  14 or 16 whose range contains the image's maximum, so 12-bit data stored in 16-bit PNGs is not left nearly black.
- DICOM: a window (WindowCenter/WindowWidth) is applied when the header has one, else the bit-depth rule with
  BitsStored; MONOCHROME1 is inverted; YBR colour is converted to RGB. Pixel spacing comes from PixelSpacing,
  then ImagerPixelSpacing, then the ultrasound region calibration (PhysicalDeltaX/Y in cm).
- Masks become int64 class indices: palette PNGs give their palette indices, 1-bit masks give 0/1, and masks whose
  only values are 0 and 255 are binary (255 -> 1). Colour (non-grey) RGB masks are rejected.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from usagg.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".npy")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class DecodedImage:
    """Decoded pixels, (H, W) for greyscale or (H, W, 3) for colour, uint8, with the spacing stored in the file."""

    pixels: np.ndarray
    spacing_mm_per_px: float | None = None

    @property
    def size_hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def is_dicom(path: Path) -> bool:
    """Return whether ``path`` is a DICOM file, by suffix or by the ``DICM`` marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _scale_to_uint8(array: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Scale integer greyscale deeper than 8 bits to uint8 by its (stored or inferred) bit depth."""
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float32)
    low = float(array.min()) if array.size else 0.0
    if low < 0:  # signed data: shift so that the minimum is 0
        array = array - low
    if bits is None:
        high = float(array.max()) if array.size else 0.0
        bits = 8
        for candidate in (8, 10, 12, 14, 16):
            bits = candidate
            if high <= 2**candidate - 1:
                break
        else:
            bits = int(np.ceil(np.log2(high + 1)))
    scale = 255.0 / (2**bits - 1)
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)


def _pil_to_array(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "1":
        return np.array(image.convert("L"))
    if mode == "L":
        return np.array(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _scale_to_uint8(np.array(image))
    if mode == "F":
        array = np.array(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        span = high - low if high > low else 1.0
        return np.clip(np.rint((array - low) / span * 255.0), 0, 255).astype(np.uint8)
    if mode == "LA":
        return np.array(image.getchannel(0))
    if mode == "RGB":
        return np.array(image)
    # Palette, RGBA, CMYK, YCbCr and others: let PIL convert to RGB (palette colours, alpha dropped).
    return np.array(image.convert("RGB"))


def _decode_dicom(path: Path) -> DecodedImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DataError(
                f"{path}: DICOM file has {frames} frames; usagg reads single-frame images only; "
                "fix: export the frame you want as its own file"
            )
        array = ds.pixel_array
    except DataError:
        raise
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError, OSError, NotImplementedError) as exc:
        raise DataError(
            f"{path}: cannot decode DICOM pixel data ({exc}); fix: check the file, or install the decoder "
            "pydicom names for compressed transfer syntaxes (for example pylibjpeg)"
        ) from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        array = convert_color_space(array, photometric, "RGB")
        photometric = "RGB"
    if array.ndim == 3 and array.shape[-1] == 3:
        pixels = _scale_to_uint8(array, int(getattr(ds, "BitsStored", 8) or 8))
    elif array.ndim == 2:
        pixels = _window_dicom(array, ds)
        if photometric == "MONOCHROME1":
            pixels = 255 - pixels
    else:
        raise DataError(f"{path}: DICOM pixel array has shape {array.shape}; expected (rows, columns) or (rows, columns, 3)")
    return DecodedImage(np.ascontiguousarray(pixels), _dicom_spacing(ds, path))


def _window_dicom(array: np.ndarray, ds) -> np.ndarray:
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        # Multi-valued windows: the first one is the default presentation.
        center, width = _first_number(center), _first_number(width)
        if width > 0:
            low = center - width / 2.0
            scaled = (array.astype(np.float32) - low) / width * 255.0
            return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    bits = int(getattr(ds, "BitsStored", 0) or 0) or None
    return _scale_to_uint8(array, bits if bits and bits > 8 else None)


def _first_number(value) -> float:
    try:
        return float(value[0])  # pydicom MultiValue
    except TypeError:
        return float(value)


def _dicom_spacing(ds, path: Path) -> float | None:
    """Return mm per pixel from the header, or None; anisotropic spacing is averaged with a warning."""
    row_col: tuple[float, float] | None = None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, keyword, None)
        if value is not None and len(value) == 2:
            row_col = (float(value[0]), float(value[1]))
            break
    if row_col is None:
        regions = getattr(ds, "SequenceOfUltrasoundRegions", None)
        if regions:
            region = regions[0]
            # Units code 3 is centimetres (DICOM PS3.3 C.8.5.5.1.1); other units are not lengths.
            if getattr(region, "PhysicalUnitsXDirection", None) == 3 and getattr(region, "PhysicalUnitsYDirection", None) == 3:
                row_col = (float(region.PhysicalDeltaY) * 10.0, float(region.PhysicalDeltaX) * 10.0)
    if row_col is None or min(row_col) <= 0:
        return None
    if abs(row_col[0] - row_col[1]) > 0.01 * max(row_col):
        # NOTE: usagg keeps one isotropic spacing per image; anisotropic pixels are averaged.
        logger.warning("%s: anisotropic pixel spacing %s mm (row, column); using their mean", path, row_col)
    return (row_col[0] + row_col[1]) / 2.0


def decode_image(path: str | os.PathLike) -> DecodedImage:
    """Decode one image file to uint8 pixels, greyscale kept as one channel."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: image file not found; fix: correct the path or restore the file")
    if is_dicom(file):
        return _decode_dicom(file)
    try:
        with Image.open(file) as image:
            image.load()
            pixels = _pil_to_array(image, file)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{file}: cannot decode image ({exc}); fix: re-export the file as PNG or JPEG") from None
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return DecodedImage(np.ascontiguousarray(pixels), None)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Decode an image to (H, W, 3) uint8, greyscale replicated, with the pixel spacing stored in the file (or None)."""
    decoded = decode_image(path)
    pixels = decoded.pixels
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return pixels, decoded.spacing_mm_per_px


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return (height, width) from the file header without decoding the pixels."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: image file not found; fix: correct the path or restore the file")
    if is_dicom(file):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        except (InvalidDicomError, AttributeError, ValueError, OSError) as exc:
            raise DataError(f"{file}: cannot read DICOM header ({exc}); fix: check the file") from None
    try:
        with Image.open(file) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{file}: cannot decode image ({exc}); fix: re-export the file as PNG or JPEG") from None
    return int(height), int(width)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a segmentation mask to (H, W) int64 class indices (see the module rules)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: mask file not found; fix: correct the mask path or restore the file")
    if file.suffix.lower() == ".npy":
        try:
            array = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{file}: cannot read mask array ({exc}); fix: save it with numpy.save") from None
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{file}: mask array has shape {array.shape} and dtype {array.dtype}; expected 2-D integers")
        return array.astype(np.int64)
    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if mode == "1":
                array = np.array(image, dtype=np.uint8)
                return array.astype(np.int64)
            if mode in ("RGB", "RGBA", "LA"):
                array = np.array(image.convert("RGB") if mode != "LA" else image.convert("LA"))
            else:
                array = np.array(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{file}: cannot decode mask ({exc}); fix: re-export it as a PNG of class indices") from None
    if array.ndim == 3:
        channels = array[..., :3] if mode != "LA" else array[..., :1]
        if channels.shape[-1] == 3 and not (
            np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise DataError(
                f"{file}: colour mask (mode {mode}) with differing R, G, B values; usagg reads class indices; "
                "fix: save the mask as a single-channel or palette PNG whose pixel values are class indices"
            )
        array = channels[..., 0]
    if mode != "P" and _is_binary_255(array):
        array = array == 255
    return array.astype(np.int64)


def _is_binary_255(array: np.ndarray) -> bool:
    """Return whether a mask contains 255 and no value other than 0 and 255 (a binary mask saved for viewing)."""
    if array.dtype == np.uint8:
        counts = np.bincount(array.ravel(), minlength=256)
        return bool(counts[255] > 0 and counts[1:255].sum() == 0)
    if array.size == 0 or array.max() != 255:
        return False
    return bool(np.all((array == 0) | (array == 255)))
