"""Vectorised shape primitives for the synthetic scenes.

Every function takes per-image parameters shaped (B, 1, 1) and coordinates that broadcast to (H, W), in
millimetres, and returns arrays that broadcast to (B, H, W).
"""

from __future__ import annotations

import numpy as np


def col(values: np.ndarray | float) -> np.ndarray:
    """Reshape per-image values (B,) to (B, 1, 1) float32 for broadcasting against image grids."""
    return np.asarray(values, dtype=np.float32).reshape(-1, 1, 1)


def ramp(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Soft step from 0 to 1 as ``signed_mm`` rises through 0, over ``width_mm`` (a blurred boundary)."""
    weight = signed_mm * np.float32(1.0 / width_mm)
    weight += np.float32(0.5)
    np.maximum(weight, 0.0, out=weight)
    return np.minimum(weight, 1.0, out=weight)


def blend(base: np.ndarray, value: np.ndarray | float, weight: np.ndarray) -> np.ndarray:
    """Return ``base`` moved towards ``value`` by ``weight`` in [0, 1] (alpha compositing)."""
    return base + (value - base) * weight


def rotate(x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to centre (cx, cy) in a frame rotated by ``angle`` (radians, x towards y)."""
    dx, dy = x - cx, y - cy
    cos, sin = np.cos(angle), np.sin(angle)
    return dx * cos + dy * sin, dy * cos - dx * sin


def ellipse_distance(u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Approximate signed distance in mm to an axis-aligned ellipse boundary; positive inside.

    Uses (1 - rho) times the mean semi-axis, where rho is the normalised radius: exact for circles and close to
    the boundary of moderately elongated ellipses, which is where the soft edges are drawn.
    """
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (1.0 - rho) * (0.5 * (a + b))


def harmonic_distance(
    u: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray, orders: np.ndarray, amplitudes: np.ndarray, phases: np.ndarray
) -> np.ndarray:
    """Signed distance (mm, positive inside) to an ellipse whose radius is modulated by angular harmonics.

    The boundary is rho(phi) = 1 + sum_k amplitude_k cos(order_k phi + phase_k) in normalised radius;
    ``orders``, ``amplitudes`` and ``phases`` are (B, K). Low orders give lobulated margins, high orders
    give angular or spiculated margins.
    """
    un, vn = u / a, v / b
    rho = np.sqrt(un * un + vn * vn)
    phi = np.arctan2(vn, un)
    boundary = np.ones_like(rho)
    for k in range(orders.shape[1]):
        boundary = boundary + col(amplitudes[:, k]) * np.cos(col(orders[:, k]) * phi + col(phases[:, k]))
    return (boundary - rho) * (0.5 * (a + b))


def ramanujan_perimeter(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Perimeter of an ellipse with semi-axes a, b (Ramanujan's second approximation, error < 1e-5 relative here)."""
    h = ((a - b) / (a + b)) ** 2
    return np.pi * (a + b) * (1 + 3 * h / (10 + np.sqrt(4 - 3 * h)))


def balanced_labels(rng: np.random.Generator, n: int, num_classes: int, offset: int = 0) -> np.ndarray:
    """Class labels ``(offset + i) % num_classes`` for i < n, in random order.

    Chunks of one split that pass their first image index as ``offset`` together hold every class equally often
    (up to one image), whatever the chunk size.
    """
    return rng.permutation((offset + np.arange(n)) % num_classes)
