"""B-mode image formation for the synthetic benchmark: probe geometry, speckle, attenuation, scan conversion.

The simulation runs in beam space (depth samples x scan lines), on a whole batch of images at once:

1. A scene gives, at every beam sample, the backscatter level in dB relative to soft tissue and the one-way
   attenuation coefficient in dB/mm. From 256 px on, the scene is drawn on a coarser beam grid (every 2nd
   sample at 256 px) and repeated to full resolution. Tissue maps vary slowly next to the speckle, so this cuts
   the cost of the scene by 4, and scatterers and labels stay at full resolution.
2. Scatterers: a random complex field whose amplitude is the square root of the backscatter power. The RF
   carrier of a 3-15 MHz probe lies far above the Nyquist frequency of a 128-512 px display grid. So the echo is
   simulated at baseband (IQ data), as scatterers convolved with the envelope of the point-spread function
   (Gaussian, separable axially and laterally). The envelope is the modulus of the IQ field, so a region of
   uniform backscatter has Rayleigh-distributed amplitude (fully developed speckle). A (1/4, 1/2, 1/4) filter
   on the echo power then smooths over about one pixel, as scanners do before display.
3. Depth gain: the two-way attenuation accumulated along each scan line is subtracted in dB and a time-gain
   compensation curve removes part of the attenuation expected from tissue. Strongly attenuating structures
   therefore cast posterior shadows, and fluid, which barely attenuates, leaves posterior enhancement.
4. Log compression to a fixed dynamic range, then scan conversion to a square Cartesian image (bilinear).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.ndimage import correlate1d

# Log compression: display value 0 at FLOOR_DB, 255 at FLOOR_DB + dynamic range; soft tissue sits near 0 dB.
FLOOR_DB = -27.0
# Smallest PSF widths in pixels (axial, lateral): below these, speckle would be single-pixel noise.
MIN_PSF_SIGMA_PX = (0.8, 1.2)


@dataclass(frozen=True)
class Probe:
    """Transducer geometry and system settings of one kind of scan.

    ``linear``: parallel scan lines, rectangular field of view. ``sector``: scan lines fan out from a virtual
    apex (convex or phased array). ``radius_mm`` is the distance from the apex to the probe face: the curvature
    radius of a convex array, or a few millimetres for a phased array.
    """

    kind: Literal["linear", "sector"]
    fov_mm: float  # side of the square output image
    psf_axial_mm: float  # standard deviation of the Gaussian pulse envelope
    psf_lateral_mm: float  # standard deviation of the beam profile at the focal depth
    attenuation_db_per_mm: float  # one-way attenuation of soft tissue at the centre frequency
    focus_mm: float  # focal depth; a small gain bump sits there
    dynamic_range_db: float = 60.0
    radius_mm: float = 0.0  # sector only
    half_angle_deg: float = 0.0  # sector only


@dataclass(frozen=True, eq=False)
class ScanGrid:
    """Sample positions of one probe at one output size, shared by every image drawn with it."""

    probe: Probe
    size: int
    spacing_mm: float  # output pixel size (square pixels)
    # The scene grid: every ``scene_factor``-th beam sample in both directions.
    scene_factor: int
    scene_x_mm: np.ndarray  # (Nr, Nl) or broadcastable: lateral position of every scene sample
    scene_y_mm: np.ndarray  # depth position (0 = top image row)
    scene_dir_x: np.ndarray  # unit vector of the scan line through every scene sample
    scene_dir_y: np.ndarray
    scene_depth_mm: np.ndarray  # (Nr, 1) distance from the probe face along the scan line
    step_mm: float  # axial beam-sample spacing along a scan line (full resolution)
    image_x_mm: np.ndarray  # (1, S) or (S, S): Cartesian position of every output pixel centre
    image_y_mm: np.ndarray
    fov_mask: np.ndarray  # (S, S) bool, True inside the imaged sector
    psf_sigma_px: tuple[float, float]  # (axial, lateral) in beam samples
    # Scan conversion (sector only): flat beam-sample indices and bilinear weights of each FOV pixel.
    fov_flat: np.ndarray | None = None
    corner_index: np.ndarray | None = None  # (4, Nfov) int
    corner_weight: np.ndarray | None = None  # (4, Nfov) float32

    @property
    def beam_shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def scene_shape(self) -> tuple[int, int]:
        return (self.size // self.scene_factor, self.size // self.scene_factor)

    def mm_to_px(self, x_mm: np.ndarray, y_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Convert Cartesian millimetres to pixel coordinates (x = column, y = row, pixel centres on integers)."""
        x_px = x_mm / self.spacing_mm + self.size / 2 - 0.5
        y_px = y_mm / self.spacing_mm - 0.5
        return x_px, y_px


def _pixel_centres_mm(size: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    x = ((np.arange(size) + 0.5) - size / 2) * spacing
    y = (np.arange(size) + 0.5) * spacing
    return x.astype(np.float32), y.astype(np.float32)


def scene_factor_for(size: int) -> int:
    """Coarsening of the scene grid: 1 below 256 px, 2 at 256 px, 4 at 512 px (always a divisor of ``size``)."""
    factor = max(1, size // 128)
    while size % factor:
        factor -= 1
    return factor


@functools.lru_cache(maxsize=32)
def scan_grid(probe: Probe, size: int) -> ScanGrid:
    """Build (and cache) the beam and image grids of ``probe`` for square ``size`` x ``size`` images."""
    spacing = probe.fov_mm / size
    x, y = _pixel_centres_mm(size, spacing)
    factor = scene_factor_for(size)
    if probe.kind == "linear":
        sigma = (max(probe.psf_axial_mm / spacing, MIN_PSF_SIGMA_PX[0]), max(probe.psf_lateral_mm / spacing, MIN_PSF_SIGMA_PX[1]))
        scene_x, scene_y = _pixel_centres_mm(size // factor, spacing * factor)
        return ScanGrid(
            probe=probe,
            size=size,
            spacing_mm=spacing,
            scene_factor=factor,
            scene_x_mm=scene_x[None, :],
            scene_y_mm=scene_y[:, None],
            scene_dir_x=np.zeros((1, 1), np.float32),
            scene_dir_y=np.ones((1, 1), np.float32),
            scene_depth_mm=scene_y[:, None],
            step_mm=spacing,
            image_x_mm=x[None, :],
            image_y_mm=y[:, None],
            fov_mask=np.ones((size, size), dtype=bool),
            psf_sigma_px=sigma,
        )
    return _sector_grid(probe, size, spacing, x, y, factor)


def _sector_grid(probe: Probe, size: int, spacing: float, x: np.ndarray, y: np.ndarray, factor: int) -> ScanGrid:
    half = math.radians(probe.half_angle_deg)
    r_min = probe.radius_mm
    # The apex sits above the image so that the whole probe face lies on or below the top row.
    apex_y = -r_min * math.cos(half)
    r_max = min(probe.fov_mm - apex_y, (probe.fov_mm / 2) / math.sin(half))
    n = size
    step_r = (r_max - r_min) / n
    step_a = 2 * half / n
    m = n // factor
    radius = (r_min + (np.arange(m) + 0.5) * step_r * factor).astype(np.float32)[:, None]
    angle = (-half + (np.arange(m) + 0.5) * step_a * factor).astype(np.float32)[None, :]
    dir_x, dir_y = np.sin(angle), np.cos(angle)

    image_x = np.broadcast_to(x[None, :], (n, n))
    image_y = np.broadcast_to(y[:, None], (n, n))
    rel_y = image_y - apex_y
    r_pix = np.hypot(image_x, rel_y)
    a_pix = np.arctan2(image_x, rel_y)
    fov = (r_pix >= r_min) & (r_pix <= r_max) & (np.abs(a_pix) <= half)
    fi = np.clip((r_pix[fov] - r_min) / step_r - 0.5, 0, n - 1.0001)
    fj = np.clip((a_pix[fov] + half) / step_a - 0.5, 0, n - 1.0001)
    i0, j0 = np.floor(fi).astype(np.int64), np.floor(fj).astype(np.int64)
    wi, wj = (fi - i0).astype(np.float32), (fj - j0).astype(np.float32)
    corner_index = np.stack([i0 * n + j0, i0 * n + j0 + 1, (i0 + 1) * n + j0, (i0 + 1) * n + j0 + 1])
    corner_weight = np.stack([(1 - wi) * (1 - wj), (1 - wi) * wj, wi * (1 - wj), wi * wj]).astype(np.float32)

    lateral_step_at_focus = probe.focus_mm * step_a
    sigma = (
        max(probe.psf_axial_mm / step_r, MIN_PSF_SIGMA_PX[0]),
        max(probe.psf_lateral_mm / lateral_step_at_focus, MIN_PSF_SIGMA_PX[1]),
    )
    return ScanGrid(
        probe=probe,
        size=size,
        spacing_mm=spacing,
        scene_factor=factor,
        scene_x_mm=(radius * dir_x).astype(np.float32),
        scene_y_mm=(apex_y + radius * dir_y).astype(np.float32),
        scene_dir_x=np.broadcast_to(dir_x, (m, m)).astype(np.float32),
        scene_dir_y=np.broadcast_to(dir_y, (m, m)).astype(np.float32),
        scene_depth_mm=(radius - r_min).astype(np.float32),
        step_mm=float(step_r),
        image_x_mm=np.ascontiguousarray(image_x, dtype=np.float32),
        image_y_mm=np.ascontiguousarray(image_y, dtype=np.float32),
        fov_mask=fov,
        psf_sigma_px=sigma,
        fov_flat=np.flatnonzero(fov),
        corner_index=corner_index,
        corner_weight=corner_weight,
    )


def _upsample(values: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every scene sample ``factor`` times along both image axes (B, h, w) -> (B, h*f, w*f)."""
    if factor == 1:
        return values
    batch, rows, cols = values.shape
    out = np.empty((batch, rows, factor, cols, factor), dtype=values.dtype)
    out[...] = values[:, :, None, :, None]
    return out.reshape(batch, rows * factor, cols * factor)


@functools.lru_cache(maxsize=16)
def _psf_kernel(sigma: float) -> np.ndarray:
    """Gaussian kernel with unit energy, so that uniform backscatter keeps its power after the convolution."""
    half = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return (taps / np.sqrt(np.sum(taps**2))).astype(np.float32)


def speckle_iq(rng: np.random.Generator, amplitude: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    """Return baseband echoes (2, B, H, W) (real, imaginary) of scatterers with the given amplitude.

    Scatterer values are uniform with unit variance in the real and imaginary parts. After the PSF sums a few
    dozen of them, the IQ field is close to circular Gaussian by the central limit theorem, so its modulus is
    Rayleigh-distributed where the amplitude is uniform (tested through the Rayleigh mean-to-standard-deviation
    ratio of 1.91).
    """
    batch, rows, cols = amplitude.shape
    scatterers = rng.random((2, batch, rows, cols), dtype=np.float32)
    scatterers -= 0.5
    scatterers *= math.sqrt(12.0) * amplitude  # unit variance, then the local backscatter amplitude
    iq = correlate1d(scatterers, _psf_kernel(sigma_px[0]), axis=2, mode="reflect")
    return correlate1d(iq, _psf_kernel(sigma_px[1]), axis=3, mode="reflect")


def speckle_power(rng: np.random.Generator, amplitude: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    """Return the displayed echo power (B, H, W): squared IQ envelope after a light post-detection filter.

    The filter averages power over about one pixel, as scanners do before display and as resampling a finer
    acquisition to this grid would. It fills the deepest speckle nulls without changing the grain size.
    """
    iq = speckle_iq(rng, amplitude, sigma_px)
    power = iq[0] * iq[0] + iq[1] * iq[1]
    return _smooth_121(_smooth_121(power, axis=1), axis=2)


def _smooth_121(values: np.ndarray, axis: int) -> np.ndarray:
    """Filter with taps (1/4, 1/2, 1/4) along ``axis``, edges mirrored; shifted slices beat correlate1d here."""
    quarter = np.float32(0.25)
    src = np.moveaxis(values, axis, 0)
    out = src * np.float32(0.5)
    out[1:] += quarter * src[:-1]
    out[:-1] += quarter * src[1:]
    out[0] += quarter * src[0]
    out[-1] += quarter * src[-1]
    return np.moveaxis(out, 0, axis)


def form_bmode(
    rng: np.random.Generator,
    grid: ScanGrid,
    echo_db: np.ndarray,
    attenuation_db_per_mm: np.ndarray,
    gain_db: np.ndarray,
    tgc_fraction: np.ndarray,
) -> np.ndarray:
    """Simulate B-mode images from scene maps; returns uint8 images (B, S, S) on the Cartesian grid.

    ``echo_db`` and ``attenuation_db_per_mm`` broadcast to (B, *grid.scene_shape); ``gain_db`` and
    ``tgc_fraction`` are per image (B,). ``tgc_fraction`` is the share of the soft-tissue attenuation that
    time-gain compensation removes (1 = flat mean brightness over depth in homogeneous tissue).
    """
    probe = grid.probe
    batch = gain_db.shape[0]
    shape = (batch, *grid.scene_shape)
    amplitude = np.exp(np.broadcast_to(echo_db, shape) * np.float32(math.log(10) / 20))
    power = speckle_power(rng, _upsample(amplitude, grid.scene_factor), grid.psf_sigma_px)
    image_db = np.log10(power + np.float32(1e-6))
    image_db *= np.float32(10.0)

    # Two-way attenuation accumulated from the probe face down each scan line.
    loss_db = np.broadcast_to(attenuation_db_per_mm, shape) * np.float32(2 * grid.step_mm * grid.scene_factor)
    # Running sum down the depth axis, one row at a time: much faster than np.cumsum along a non-last axis.
    for row in range(1, loss_db.shape[1]):
        loss_db[:, row] += loss_db[:, row - 1]
    depth = grid.scene_depth_mm[None]  # (1, Nr, 1)
    tgc_db = (2 * probe.attenuation_db_per_mm * tgc_fraction.astype(np.float32))[:, None, None] * depth
    focal_db = 2.0 * np.exp(-0.5 * ((depth - probe.focus_mm) / (0.2 * probe.fov_mm)) ** 2)
    offset_db = (tgc_db + focal_db + gain_db.astype(np.float32)[:, None, None] - np.float32(FLOOR_DB)) - loss_db
    image_db += _upsample(offset_db, grid.scene_factor)

    image_db *= np.float32(255.0 / probe.dynamic_range_db)
    np.maximum(image_db, 0.0, out=image_db)
    display = np.minimum(image_db, 255.0, out=image_db)
    if grid.corner_index is None:
        display += np.float32(0.5)  # round to the nearest grey level when casting
        return display.astype(np.uint8)
    return _scan_convert(display, grid)


def _scan_convert(display: np.ndarray, grid: ScanGrid) -> np.ndarray:
    batch = display.shape[0]
    # Gather along the first axis of a (samples, batch) copy: each index then reads one contiguous row.
    samples = np.ascontiguousarray(display.reshape(batch, -1).T)
    values = np.full((grid.fov_flat.size, batch), 0.5, dtype=np.float32)  # + 0.5: round when casting
    for corner in range(4):
        values += samples[grid.corner_index[corner]] * grid.corner_weight[corner][:, None]
    out = np.zeros((grid.size * grid.size, batch), dtype=np.uint8)
    out[grid.fov_flat] = values.astype(np.uint8)
    return np.ascontiguousarray(out.T).reshape(batch, grid.size, grid.size)


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Smooth (Gaussian-weighted) interpolation from ``n_in`` control points to ``n_out`` samples."""
    centres = (np.arange(n_in) + 0.5) / n_in
    positions = (np.arange(n_out) + 0.5) / n_out
    width = 0.7 / n_in
    weights = np.exp(-0.5 * ((positions[:, None] - centres[None, :]) / width) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, batch: int, control: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Draw smooth random fields (B, H, W) with unit-order amplitude from a ``control`` grid of Gaussian values.

    A control grid with more rows than columns gives horizontally elongated blobs (tissue layers, fibres).
    """
    coarse = rng.standard_normal((batch, *control), dtype=np.float32)
    rows = _interp_matrix(shape[0], control[0])
    cols = _interp_matrix(shape[1], control[1])
    field = rows @ coarse @ cols.T
    # Interpolation averages neighbouring control values. The variance of an interpolated value is the product
    # of the squared row and column weights, so this constant restores unit variance on average.
    gain = 1.0 / math.sqrt(float(np.mean(np.sum(rows**2, axis=1)) * np.mean(np.sum(cols**2, axis=1))))
    return field * np.float32(gain)
