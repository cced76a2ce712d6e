"""Synthetic anatomies ("organs"): latent factors, backscatter and attenuation maps, and label maps.

Each organ draws per-image latent factors, turns them into beam-space maps for the B-mode simulation in
``speckle.py`` and into a Cartesian label map whose class indices are the organ's ``class_names``. Echo levels
are in dB relative to soft tissue; attenuation is one-way, in dB/mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from usagg.data.synthetic.geometry import (
    balanced_labels,
    blend,
    col,
    ellipse_distance,
    harmonic_distance,
    ramanujan_perimeter,
    ramp,
    rotate,
)
from usagg.data.synthetic.speckle import (
    Probe,
    ScanGrid,
    form_bmode,
    scan_grid,
    smooth_noise,
)

FLUID_DB = -60.0  # blood, amniotic fluid and cyst content: almost no backscatter
FLUID_ATTENUATION = 0.02  # dB/mm, far below soft tissue, hence posterior enhancement

Latents = dict[str, np.ndarray]
# Pixels simulated at once: 4 images of 256 x 256 px. Larger batches spill out of the CPU caches: in one
# CPU-time check on a shared AMD EPYC, 32 images at 256 px took 3.0 ms each in fours and 3.7 ms in one batch.
MAX_PIXELS_PER_BATCH = 1 << 18


@dataclass
class SceneBatch:
    """Rendered images of one organ with their label maps and latent factors."""

    images: np.ndarray  # (B, S, S) uint8 B-mode
    label_maps: np.ndarray  # (B, S, S) uint8 class indices (organ.class_names), 0 outside the field of view
    latents: Latents  # name -> (B,) values; keypoints in output pixels, sizes in mm
    spacing_mm: float


class Organ:
    """Base class: subclasses set the probe and classes and implement sampling, maps and labels."""

    name: str = ""
    probe: Probe
    class_names: tuple[str, ...] = ("background",)

    def render(self, rng: np.random.Generator, n: int, size: int, options: dict[str, Any] | None = None) -> SceneBatch:
        """Draw ``n`` scenes and simulate their B-mode images at ``size`` x ``size`` pixels.

        Work runs in sub-batches of at most MAX_PIXELS_PER_BATCH pixels. Array values in ``options`` (forced
        labels) are split with the images.
        """
        options = dict(options or {})
        step = max(1, MAX_PIXELS_PER_BATCH // (size * size))
        if n <= step:
            return self._render_batch(rng, n, size, options)
        parts = []
        for start in range(0, n, step):
            count = min(step, n - start)
            sub = {k: v[start : start + count] if isinstance(v, np.ndarray) else v for k, v in options.items()}
            sub["index_offset"] = int(options.get("index_offset", 0)) + start
            parts.append(self._render_batch(rng, count, size, sub))
        return SceneBatch(
            images=np.concatenate([p.images for p in parts]),
            label_maps=np.concatenate([p.label_maps for p in parts]),
            latents={key: np.concatenate([p.latents[key] for p in parts]) for key in parts[0].latents},
            spacing_mm=parts[0].spacing_mm,
        )

    def _render_batch(self, rng: np.random.Generator, n: int, size: int, options: dict[str, Any]) -> SceneBatch:
        grid = scan_grid(self.probe, size)
        latents = self.sample(rng, n, grid, options)
        scene_geometry = self.geometry(latents, grid.scene_x_mm, grid.scene_y_mm)
        echo_db, attenuation = self.scene_maps(rng, latents, grid, scene_geometry)
        images = form_bmode(rng, grid, echo_db, attenuation, latents["gain_db"], latents["tgc_fraction"])
        if self.probe.kind == "linear" and grid.scene_factor == 1:
            image_geometry = scene_geometry  # scene samples and pixels coincide
        else:
            image_geometry = self.geometry(latents, grid.image_x_mm, grid.image_y_mm)
        label_maps = np.broadcast_to(self.label_map(image_geometry), images.shape).astype(np.uint8, copy=True)
        label_maps[:, ~grid.fov_mask] = 0
        return SceneBatch(images=images, label_maps=label_maps, latents=latents, spacing_mm=grid.spacing_mm)

    def sample(self, rng: np.random.Generator, n: int, grid: ScanGrid, options: dict[str, Any]) -> Latents:
        """Draw the latent factors of ``n`` scenes: arrays of shape (n,), plus private ``_``-prefixed extras.

        ``options`` may force class latents (e.g. ``{"malignant": array}``) or pass ``index_offset``.
        """
        raise NotImplementedError

    def geometry(self, lat: Latents, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Signed distances (mm, positive inside) of the labelled structures at coordinates (x, y)."""
        raise NotImplementedError

    def scene_maps(
        self, rng: np.random.Generator, lat: Latents, grid: ScanGrid, geo: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return echo level (dB) and one-way attenuation (dB/mm) on the scene grid, shaped (n, *scene_shape)."""
        raise NotImplementedError

    def label_map(self, geo: dict[str, np.ndarray]) -> np.ndarray:
        """Return class indices (n, S, S) from the structures' signed distances on the image grid."""
        raise NotImplementedError


def _common_system(
    rng: np.random.Generator, n: int, gain_range_db: float = 2.0, tgc_range: tuple[float, float] = (0.8, 1.0)
) -> Latents:
    """Draw receive gain (dB) and the time-gain-compensation share of each image.

    Fluid-filled views get a smaller share, so that tissue behind the fluid does not saturate.
    """
    return {
        "gain_db": rng.uniform(-gain_range_db, gain_range_db, n).astype(np.float32),
        "tgc_fraction": rng.uniform(*tgc_range, n).astype(np.float32),
    }


def _forced_or_balanced(rng: np.random.Generator, n: int, options: dict[str, Any], key: str, classes: int) -> np.ndarray:
    """Class labels given in ``options[key]``, else balanced ones (``options["index_offset"]``: see balanced_labels)."""
    if key in options:
        return np.asarray(options[key], dtype=np.int64)
    return balanced_labels(rng, n, classes, offset=int(options.get("index_offset", 0)))


def _texture(rng: np.random.Generator, n: int, grid: ScanGrid, control: tuple[int, int]) -> np.ndarray:
    """Smooth unit-variance tissue texture on the scene grid (see ``smooth_noise``)."""
    return smooth_noise(rng, n, control, grid.scene_shape)


def _wave(x: np.ndarray, base: np.ndarray, amplitude: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Depth of an undulating tissue interface at lateral positions x."""
    return col(base) + col(amplitude) * np.sin(np.float32(2 * np.pi) * x / col(period) + col(phase))


# --- breast ----------------------------------------------------------------------------------------


class Breast(Organ):
    """Breast scanned with a linear probe: skin, fat with Cooper's ligaments, fibroglandular layer, pectoralis.

    Latent factors: ``density`` (0 fatty, 1 heterogeneous, 2 dense: share and brightness of fibroglandular
    tissue), the lesion's position and size, and ``malignant``: malignant lesions have spiculated margins
    (``irregularity`` > 0.11), a taller-than-wide or round shape, heterogeneous internal echoes, an echogenic
    halo and posterior shadowing; benign ones are oval, parallel to the skin, smooth, darker and enhance
    posteriorly.
    """

    name = "breast"
    probe = Probe(kind="linear", fov_mm=40.0, psf_axial_mm=0.12, psf_lateral_mm=0.4, attenuation_db_per_mm=0.35, focus_mm=18.0)
    class_names = ("background", "lesion")
    IRREGULARITY_THRESHOLD = 0.11

    def sample(self, rng: np.random.Generator, n: int, grid: ScanGrid, options: dict[str, Any]) -> Latents:
        lat = _common_system(rng, n)
        if "density" in options or options.get("balance_density"):
            density = _forced_or_balanced(rng, n, options, "density", 3)
        else:
            density = rng.integers(0, 3, n)
        malignant = _forced_or_balanced(rng, n, options, "malignant", 2)
        lesion_prob = float(options.get("lesion_prob", 1.0))
        lat["density"] = density.astype(np.int64)
        lat["skin_mm"] = rng.uniform(0.8, 1.6, n)
        lat["fat_mm"] = rng.uniform(5.0, 10.0, n)
        lat["fat_wave_mm"] = rng.uniform(0.5, 2.0, n)
        lat["fat_period_mm"] = rng.uniform(15.0, 40.0, n)
        lat["fat_phase"] = rng.uniform(0, 2 * np.pi, n)
        lat["gland_mm"] = lat["fat_mm"] + rng.uniform(12.0, 17.0, n) * np.array([0.75, 0.95, 1.15])[density]
        lat["gland_period_mm"] = rng.uniform(20.0, 50.0, n)
        lat["gland_phase"] = rng.uniform(0, 2 * np.pi, n)
        lat["muscle_mm"] = lat["gland_mm"] + rng.uniform(2.0, 4.5, n)
        lat["ligament_angle"] = rng.uniform(-0.9, 0.9, n)
        lat["ligament_period_mm"] = rng.uniform(8.0, 14.0, n)
        lat["ligament_phase"] = rng.uniform(0, 2 * np.pi, n)
        lat["rib"] = (rng.random(n) < 0.3).astype(np.int64)
        lat["rib_x_mm"] = rng.uniform(-14, 14, n)
        lat["rib_y_mm"] = np.maximum(lat["muscle_mm"] + 6.0, 34.0) + rng.uniform(0, 3, n)

        lat["lesion"] = (rng.random(n) < lesion_prob).astype(np.int64)
        lat["malignant"] = malignant.astype(np.int64)
        is_malignant = malignant == 1
        lat["lesion_x_mm"] = rng.uniform(-9, 9, n)
        lat["lesion_y_mm"] = rng.uniform(12, 23, n)
        lat["lesion_a_mm"] = rng.uniform(3.5, 8.0, n)
        lat["lesion_aspect"] = np.where(is_malignant, rng.uniform(0.8, 1.2, n), rng.uniform(0.45, 0.75, n))
        lat["lesion_b_mm"] = lat["lesion_a_mm"] * lat["lesion_aspect"]
        lat["lesion_tilt"] = rng.uniform(-0.35, 0.35, n)
        # Margin: one low-order lobulation plus two high-order terms. The summed high-order amplitude is the
        # irregularity index that defines the malignancy label, with a gap from 0.06 to 0.16 between the classes.
        high = np.where(is_malignant, rng.uniform(0.16, 0.30, n), rng.uniform(0.0, 0.06, n))
        split = rng.uniform(0.35, 0.65, n)
        lat["irregularity"] = high
        orders = np.stack([rng.integers(2, 4, n), rng.integers(6, 10, n), rng.integers(11, 17, n)], axis=1)
        amplitudes = np.stack([rng.uniform(0.02, 0.08, n), high * split, high * (1 - split)], axis=1)
        lat["_margin_orders"] = orders.astype(np.float32)
        lat["_margin_amplitudes"] = amplitudes.astype(np.float32)
        lat["_margin_phases"] = rng.uniform(0, 2 * np.pi, (n, 3)).astype(np.float32)
        lat["lesion_echo_db"] = np.where(is_malignant, rng.uniform(-22, -15, n), rng.uniform(-32, -20, n))
        lat["halo"] = (is_malignant & (rng.random(n) < 0.6)).astype(np.int64)
        lat["lesion_attenuation"] = np.where(is_malignant, rng.uniform(0.8, 1.4, n), rng.uniform(0.0, 0.1, n))
        return lat

    def geometry(self, lat: Latents, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        u, v = rotate(x, y, col(lat["lesion_x_mm"]), col(lat["lesion_y_mm"]), col(lat["lesion_tilt"]))
        lesion = harmonic_distance(
            u, v, col(lat["lesion_a_mm"]), col(lat["lesion_b_mm"]),
            lat["_margin_orders"], lat["_margin_amplitudes"], lat["_margin_phases"],
        )
        lesion = np.where(col(lat["lesion"]) > 0, lesion, np.float32(-100.0))
        return {"lesion": lesion}

    def scene_maps(self, rng, lat, grid, geo):
        n = lat["gain_db"].shape[0]
        x, y = grid.scene_x_mm, grid.scene_y_mm
        density = lat["density"]
        alpha0 = self.probe.attenuation_db_per_mm

        fat_bottom = _wave(x, lat["fat_mm"], lat["fat_wave_mm"], lat["fat_period_mm"], lat["fat_phase"])
        gland_bottom = _wave(x, lat["gland_mm"], lat["fat_wave_mm"] * 1.5, lat["gland_period_mm"], lat["gland_phase"])
        muscle_top = _wave(x, lat["muscle_mm"], lat["fat_wave_mm"], lat["gland_period_mm"], lat["gland_phase"] + 0.5)

        lobules = _texture(rng, n, grid, (6, 10))
        fibres = _texture(rng, n, grid, (30, 8))
        # Pectoralis: dark muscle with bright, slightly wavy fibre sheaths.
        striation = np.sin(np.float32(2 * np.pi / 1.6) * y + 0.8 * fibres)
        echo = np.float32(-9.0) + np.float32(6.0) * (striation > 0.8)
        # Retromammary fat above the muscle.
        echo = blend(echo, -13.0 + 2.0 * lobules, ramp(muscle_top - y, 0.6))
        # Fibroglandular layer: bright fibrous tissue with fat islands; density sets the fibrous share and level.
        threshold = col(np.array([0.55, 0.0, -0.9], np.float32)[density])
        level = col(np.array([0.0, 2.0, 4.0], np.float32)[density])
        fibrous = ramp(fibres - threshold, 0.5)
        gland = blend(np.float32(-13.0) + lobules, level + 1.5 * lobules, fibrous)
        echo = blend(echo, gland, ramp(gland_bottom - y, 0.8))
        # Subcutaneous fat: dark lobules separated by thin, bright Cooper's ligaments.
        angle = col(lat["ligament_angle"])
        phase = np.float32(2 * np.pi) * (x * np.cos(angle) + y * np.sin(angle)) / col(lat["ligament_period_mm"])
        ligaments = np.abs(np.sin(phase + col(lat["ligament_phase"]) + 1.6 * lobules)) > 0.97
        fat = np.float32(-14.0) + 2.5 * lobules + np.float32(10.0) * ligaments
        echo = blend(echo, fat, ramp(fat_bottom - y, 0.6))
        # Skin: a bright double line under a thin dark coupling-gel layer.
        skin = col(lat["skin_mm"])
        echo = blend(echo, 8.0, ramp(skin - y, 0.3) * ramp(y - 0.3, 0.2))
        echo = blend(echo, -25.0, ramp(0.3 - y, 0.2))

        attenuation = np.full(echo.shape, alpha0, np.float32)
        # Rib: bright anterior cortex and a dense acoustic shadow behind it.
        rib_u, rib_v = x - col(lat["rib_x_mm"]), y - col(lat["rib_y_mm"])
        rib = np.where(col(lat["rib"]) > 0, ellipse_distance(rib_u, rib_v, np.float32(6.0), np.float32(3.5)), np.float32(-100.0))
        cortex = ramp(rib, 0.5) * ramp(0.9 - rib, 0.5) * (rib_v < 0)
        echo = blend(echo, 18.0, cortex)
        attenuation = attenuation + np.float32(4.0) * ramp(rib - 0.5, 0.4)

        # Lesion: internal echo, optional echogenic halo, posterior shadow or enhancement.
        lesion = geo["lesion"]
        inside = ramp(lesion, 0.35)
        halo = ramp(-lesion, 0.3) * ramp(lesion + 1.4, 0.5) * col(lat["halo"])
        echo = blend(echo, 5.0, halo)
        heterogeneity = np.where(col(lat["malignant"]) > 0, 2.5 * lobules, 0.6 * lobules)
        echo = blend(echo, col(lat["lesion_echo_db"]) + heterogeneity, inside)
        attenuation = blend(attenuation, col(lat["lesion_attenuation"]), inside)
        return echo, attenuation

    def label_map(self, geo: dict[str, np.ndarray]) -> np.ndarray:
        return (geo["lesion"] > 0).astype(np.uint8)


# --- fetal head ------------------------------------------------------------------------------------


class FetalHead(Organ):
    """Axial view of a fetal head in amniotic fluid, scanned with a convex probe.

    Latent factors: head pose (centre, orientation) and head size (outer skull semi-axes, from which the head
    circumference in mm follows). The skull echo weakens where the beam runs along it and shadows the brain.
    """

    name = "fetal_head"
    probe = Probe(
        kind="sector", fov_mm=160.0, radius_mm=40.0, half_angle_deg=27.0,
        psf_axial_mm=0.7, psf_lateral_mm=1.0, attenuation_db_per_mm=0.15, focus_mm=75.0,
    )
    class_names = ("background", "head")

    def sample(self, rng: np.random.Generator, n: int, grid: ScanGrid, options: dict[str, Any]) -> Latents:
        lat = _common_system(rng, n, tgc_range=(0.45, 0.65))
        lat["wall_mm"] = rng.uniform(12.0, 24.0, n)
        lat["pocket_a_mm"] = rng.uniform(8.0, 28.0, n)  # amniotic fluid around the head, beyond the skull
        lat["pocket_b_mm"] = rng.uniform(6.0, 22.0, n)
        a = rng.uniform(26.0, 50.0, n)
        b = a * rng.uniform(0.74, 0.86, n)
        angle = rng.uniform(0, np.pi, n)
        cx, cy = self._place_heads(rng, a, b, angle, lat["wall_mm"])
        lat["head_x_mm"], lat["head_y_mm"], lat["head_angle"] = cx, cy, angle
        lat["head_a_mm"], lat["head_b_mm"] = a, b
        lat["skull_mm"] = rng.uniform(2.2, 3.6, n)
        lat["skull_echo_db"] = rng.uniform(16.0, 22.0, n)
        lat["skull_attenuation"] = rng.uniform(0.5, 0.9, n)
        lat["brain_echo_db"] = rng.uniform(-13.0, -7.0, n)
        lat["csp_side"] = rng.choice([-1.0, 1.0], n)
        lat["hc_mm"] = ramanujan_perimeter(a, b)
        lat["body"] = (rng.random(n) < 0.5).astype(np.int64)
        lat["body_angle"] = rng.uniform(0, 2 * np.pi, n)
        # Major-axis end points of the outer skull ellipse, in output pixels; point 1 has the smaller x.
        ends_x = np.stack([cx - a * np.cos(angle), cx + a * np.cos(angle)], axis=1)
        ends_y = np.stack([cy - a * np.sin(angle), cy + a * np.sin(angle)], axis=1)
        order = np.argsort(ends_x, axis=1)
        ends_x = np.take_along_axis(ends_x, order, axis=1)
        ends_y = np.take_along_axis(ends_y, order, axis=1)
        px, py = grid.mm_to_px(ends_x, ends_y)
        lat["point_1_x_px"], lat["point_1_y_px"] = px[:, 0], py[:, 0]
        lat["point_2_x_px"], lat["point_2_y_px"] = px[:, 1], py[:, 1]
        return lat

    def _place_heads(
        self, rng: np.random.Generator, a: np.ndarray, b: np.ndarray, angle: np.ndarray, wall_mm: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw head centres so that each head lies inside the sector, below the abdominal wall.

        Rejection sampling, vectorised over the heads still unplaced. NOTE: a head that fits nowhere after 300
        draws is shrunk (``a`` and ``b`` in place) by 5 % per further 20 draws. This thins the large end of the
        size distribution slightly: 5 of 4 000 heads were shrunk in a check with seed 0.
        """
        probe = self.probe
        half = math.radians(probe.half_angle_deg)
        apex_y = -probe.radius_mm * math.cos(half)
        r_max = min(probe.fov_mm - apex_y, (probe.fov_mm / 2) / math.sin(half))
        n = a.shape[0]
        cx, cy = np.zeros(n), np.zeros(n)
        todo = np.arange(n)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        for attempt in range(600):
            if todo.size == 0:
                return cx, cy
            if attempt >= 300 and attempt % 20 == 0:
                a[todo] *= 0.95
                b[todo] *= 0.95
            cx[todo] = rng.uniform(-30, 30, todo.size)
            cy[todo] = rng.uniform(40, 115, todo.size)
            cos_t, sin_t = np.cos(t), np.sin(t)
            cos_h, sin_h = np.cos(angle[todo, None]), np.sin(angle[todo, None])
            major, minor = a[todo, None], b[todo, None]
            px = cx[todo, None] + major * cos_t * cos_h - minor * sin_t * sin_h
            py = cy[todo, None] + major * cos_t * sin_h + minor * sin_t * cos_h
            radius = np.hypot(px, py - apex_y)
            bearing = np.arctan2(px, py - apex_y)
            inside = (
                (py.min(axis=1) > wall_mm[todo] + 4)
                & (radius.max(axis=1) < r_max - 6)
                & (np.abs(bearing).max(axis=1) < half - math.radians(3))
            )
            todo = todo[~inside]
        if todo.size:
            raise RuntimeError(f"could not place {todo.size} fetal heads inside the field of view")
        return cx, cy

    def geometry(self, lat, x, y):
        u, v = rotate(x, y, col(lat["head_x_mm"]), col(lat["head_y_mm"]), col(lat["head_angle"]))
        a, b = col(lat["head_a_mm"]), col(lat["head_b_mm"])
        return {"head": ellipse_distance(u, v, a, b), "u": u, "v": v}

    def scene_maps(self, rng, lat, grid, geo):
        n = lat["gain_db"].shape[0]
        x, y = grid.scene_x_mm, grid.scene_y_mm
        alpha0 = self.probe.attenuation_db_per_mm
        texture = _texture(rng, n, grid, (12, 12))
        bands = _texture(rng, n, grid, (6, 3))

        # Uterine and maternal tissue, a pocket of amniotic fluid around the head, the abdominal wall on top.
        echo = np.float32(-5.0) + 3.0 * texture + 2.0 * bands
        attenuation = np.full(echo.shape, alpha0, np.float32)
        u, v = geo["u"], geo["v"]
        pocket_distance = ellipse_distance(
            u, v, col(lat["head_a_mm"] + lat["pocket_a_mm"]), col(lat["head_b_mm"] + lat["pocket_b_mm"])
        )
        pocket = ramp(pocket_distance + 5.0 * bands, 2.0)
        echo = blend(echo, FLUID_DB, pocket)
        attenuation = blend(attenuation, FLUID_ATTENUATION, pocket)
        wall_depth = col(lat["wall_mm"]) + 2.0 * bands
        wall = ramp(wall_depth - y, 1.0)
        wall_layers = np.float32(-5.0) + 4.0 * np.sin(np.float32(2 * np.pi / 5.0) * y + 1.5 * bands) + 2.0 * texture
        echo = blend(echo, wall_layers, wall)
        attenuation = blend(attenuation, alpha0, wall)
        # A fetal body part at the edge of the field, sometimes.
        bx = col(lat["head_x_mm"]) + 1.25 * (col(lat["head_a_mm"]) + 18) * np.cos(col(lat["body_angle"]))
        by = col(lat["head_y_mm"]) + 1.25 * (col(lat["head_a_mm"]) + 18) * np.sin(col(lat["body_angle"]))
        body = ramp(ellipse_distance(x - bx, y - by, np.float32(22.0), np.float32(16.0)), 1.5) * col(lat["body"])
        body = body * (1 - wall)
        echo = blend(echo, -6.0 + 3.0 * texture, body)
        attenuation = blend(attenuation, alpha0, body)

        # Skull: a bright ring whose echo drops where the beam runs along the bone (specular reflection).
        head = geo["head"]
        a, b = col(lat["head_a_mm"]), col(lat["head_b_mm"])
        skull_t = col(lat["skull_mm"])
        skull = ramp(head, 0.6) * ramp(skull_t - head, 0.6)
        inside = ramp(head - skull_t, 0.6)
        angle = col(lat["head_angle"])
        nu, nv = u / (a * a), v / (b * b)
        nx = nu * np.cos(angle) - nv * np.sin(angle)
        ny = nu * np.sin(angle) + nv * np.cos(angle)
        incidence = np.abs(nx * grid.scene_dir_x + ny * grid.scene_dir_y) / (np.sqrt(nx * nx + ny * ny) + np.float32(1e-6))
        skull_db = col(lat["skull_echo_db"]) + 20 * np.log10(0.25 + 0.75 * incidence)
        echo = blend(echo, skull_db, skull)
        attenuation = blend(attenuation, col(lat["skull_attenuation"]), skull)
        # Brain: low echoes, midline falx, thalami and the cavum septi pellucidi.
        brain = col(lat["brain_echo_db"]) + 2.5 * texture
        inner_a = a - skull_t
        falx = ramp(0.5 - np.abs(v), 0.4) * ramp(0.85 * inner_a - np.abs(u), 2.0)
        brain = blend(brain, 4.0, falx)
        thalamus = np.maximum(
            ramp(ellipse_distance(u + 0.05 * a, v - 0.22 * b, 0.16 * a, 0.11 * b), 1.0),
            ramp(ellipse_distance(u + 0.05 * a, v + 0.22 * b, 0.16 * a, 0.11 * b), 1.0),
        )
        brain = blend(brain, -20.0, thalamus)
        side = col(lat["csp_side"])
        csp = ramp(ellipse_distance(u - side * 0.38 * a, v, 0.09 * a, 0.07 * b), 0.6)
        brain = blend(brain, FLUID_DB, csp)
        echo = blend(echo, brain, inside)
        attenuation = blend(attenuation, alpha0, inside)
        return echo, attenuation

    def label_map(self, geo):
        return (geo["head"] > 0).astype(np.uint8)


# --- heart -----------------------------------------------------------------------------------------


class Heart(Organ):
    """Apical four-chamber view scanned with a phased array: ventricles above, atria below the valve plane.

    Latent factors: the chamber layout (tilt, heart size, septum and wall thickness, atrial sizes) and the left
    ventricle's size ``lv_scale``; ``lv_dilated`` is 1 when ``lv_scale`` > 1.06 (classes do not overlap:
    normal 0.78-1.00, dilated 1.12-1.40).
    """

    name = "heart"
    probe = Probe(
        kind="sector", fov_mm=176.0, radius_mm=3.0, half_angle_deg=36.0,
        psf_axial_mm=0.6, psf_lateral_mm=1.8, attenuation_db_per_mm=0.12, focus_mm=70.0,
    )
    class_names = ("background", "left_ventricle", "right_ventricle", "left_atrium", "right_atrium")
    DILATION_THRESHOLD = 1.06

    def sample(self, rng, n, grid, options):
        lat = _common_system(rng, n, tgc_range=(0.6, 0.8))
        dilated = _forced_or_balanced(rng, n, options, "lv_dilated", 2)
        lat["lv_dilated"] = dilated.astype(np.int64)
        lat["lv_scale"] = np.where(dilated == 1, rng.uniform(1.12, 1.40, n), rng.uniform(0.78, 1.00, n))
        g = rng.uniform(0.92, 1.08, n)
        lat["heart_scale"] = g
        lat["tilt"] = rng.uniform(-0.18, 0.18, n)
        lat["apex_x_mm"] = rng.uniform(-6, 6, n)
        lat["apex_y_mm"] = rng.uniform(16, 26, n)
        lat["septum_mm"] = rng.uniform(8.0, 12.0, n) * g
        lat["wall_mm"] = rng.uniform(7.0, 10.0, n) * g
        lat["lv_length_mm"] = 46.0 * g * lat["lv_scale"]
        lat["lv_width_mm"] = 25.0 * g * lat["lv_scale"] ** 0.8
        lat["rv_length_mm"] = 38.0 * g * rng.uniform(0.9, 1.1, n)
        lat["rv_width_mm"] = 20.0 * g * rng.uniform(0.85, 1.15, n)
        lat["la_length_mm"] = 28.0 * g * rng.uniform(0.9, 1.15, n)
        lat["la_width_mm"] = 25.0 * g * rng.uniform(0.9, 1.1, n)
        lat["ra_length_mm"] = 27.0 * g * rng.uniform(0.9, 1.15, n)
        lat["ra_width_mm"] = 23.0 * g * rng.uniform(0.9, 1.1, n)
        # Area of the cut ellipse (semi-axes L/1.4 and W/2, cut at 0.4 of the long semi-axis past the centre):
        # A * B * (pi/2 + asin(c) + c * sqrt(1 - c^2)) with c = 0.4.
        cut = 0.4
        lat["lv_area_mm2"] = (lat["lv_length_mm"] / 1.4) * (lat["lv_width_mm"] / 2) * (
            np.pi / 2 + np.arcsin(cut) + cut * np.sqrt(1 - cut * cut)
        )
        return lat

    def geometry(self, lat, x, y):
        s, t = rotate(x, y, col(lat["apex_x_mm"]), col(lat["apex_y_mm"]), col(lat["tilt"]) + np.float32(np.pi / 2))
        t = -t  # positive t towards the image right (the left ventricle's side in this view)
        apex_wall = col(lat["wall_mm"])
        half_sep = col(lat["septum_mm"]) / 2
        lv_l, lv_w = col(lat["lv_length_mm"]), col(lat["lv_width_mm"])
        valve = apex_wall + lv_l
        rv_l, rv_w = col(lat["rv_length_mm"]), col(lat["rv_width_mm"])
        la_l, la_w = col(lat["la_length_mm"]), col(lat["la_width_mm"])
        ra_l, ra_w = col(lat["ra_length_mm"]), col(lat["ra_width_mm"])
        gap = np.float32(4.0)  # annulus between ventricle and atrium
        # Ventricles: ellipses cut at the valve plane 40 % of a semi-axis below their widest point (bullet shape).
        lv_axis, rv_axis = lv_l / 1.4, rv_l / 1.4
        geo = {
            "lv": np.minimum(
                ellipse_distance(s - valve + 0.4 * lv_axis, t - half_sep - lv_w / 2, lv_axis, lv_w / 2), valve - s
            ),
            "rv": np.minimum(
                ellipse_distance(s - valve + 0.4 * rv_axis, t + half_sep + rv_w / 2, rv_axis, rv_w / 2), valve - s
            ),
            "la": ellipse_distance(s - valve - gap - la_l / 2, t - half_sep - la_w / 2, la_l / 2, la_w / 2),
            "ra": ellipse_distance(s - valve - gap - ra_l / 2, t + half_sep + ra_w / 2, ra_l / 2, ra_w / 2),
            "s": s,
            "t": t,
            "valve": valve,
        }
        return geo

    def scene_maps(self, rng, lat, grid, geo):
        n = lat["gain_db"].shape[0]
        y = grid.scene_y_mm
        alpha0 = self.probe.attenuation_db_per_mm
        texture = _texture(rng, n, grid, (10, 10))
        fibres = _texture(rng, n, grid, (24, 12))
        wall = col(lat["wall_mm"])
        chambers = np.maximum(np.maximum(geo["lv"], geo["rv"]), np.maximum(geo["la"], geo["ra"]))
        # Myocardium: everything within one wall thickness of a chamber; atrial walls are thinner.
        ventricles = np.maximum(geo["lv"], geo["rv"])
        atria = np.maximum(geo["la"], geo["ra"])
        muscle = np.maximum(ventricles + wall, atria + 0.3 * wall)
        myocardium = ramp(muscle, 1.0)
        # Surroundings: lung and mediastinum, mid-grey and patchy; chest wall near the probe.
        echo = np.float32(-14.0) + 5.0 * texture
        echo = blend(echo, -4.0 + 3.0 * texture, ramp(12.0 - y, 3.0))
        pericardium = ramp(muscle + 2.5, 1.0) * ramp(-muscle, 1.0)
        echo = blend(echo, 6.0 + 3.0 * texture, pericardium)
        echo = blend(echo, -5.0 + 2.5 * fibres + 2.0 * texture, myocardium)
        # Mitral and tricuspid leaflets: short bright lines along the valve plane, open in the middle.
        s, t = geo["s"], geo["t"]
        valve = geo["valve"]
        plane = ramp(1.2 - np.abs(s - valve - 2.0), 0.5)
        half_sep = col(lat["septum_mm"]) / 2
        lv_w, rv_w = col(lat["lv_width_mm"]), col(lat["rv_width_mm"])
        mitral_open = np.abs(t - half_sep - lv_w / 2) > 0.25 * lv_w
        tricuspid_open = np.abs(t + half_sep + rv_w / 2) > 0.25 * rv_w
        leaflets = plane * ((mitral_open & (t > half_sep) & (t < half_sep + lv_w)) | (tricuspid_open & (t < -half_sep) & (t > -half_sep - rv_w)))
        blood = ramp(chambers, 0.8)
        echo = blend(echo, FLUID_DB + 3.0 * texture, blood)
        echo = blend(echo, 8.0, leaflets * (1 - ramp(chambers - 1.5, 1.0)))
        attenuation = blend(np.full(echo.shape, alpha0, np.float32), FLUID_ATTENUATION, blood)
        return echo, attenuation

    def label_map(self, geo):
        stacked = np.stack(np.broadcast_arrays(geo["lv"], geo["rv"], geo["la"], geo["ra"]))
        inside = stacked > 0
        labels = np.zeros(stacked.shape[1:], np.uint8)
        for index in range(3, -1, -1):  # earlier classes win where shapes touch
            labels[inside[index]] = index + 1
        return labels


# --- thyroid ---------------------------------------------------------------------------------------


class Thyroid(Organ):
    """Transverse view of one thyroid lobe with trachea, carotid artery, jugular vein and strap muscles.

    Latent factors: the nodule's position and size, its echogenicity relative to the gland (``hypoechoic``:
    -14 to -6 dB, otherwise +5 to +9 dB) and the overall receive gain ``gain_db`` (3 to 10 dB in magnitude;
    ``over_gain`` = 1 for positive gain). Gain varies in every thyroid image, so absolute brightness does not
    tell a hypoechoic nodule from a hyperechoic one.
    """

    name = "thyroid"
    probe = Probe(kind="linear", fov_mm=40.0, psf_axial_mm=0.2, psf_lateral_mm=0.4, attenuation_db_per_mm=0.45, focus_mm=15.0)
    class_names = ("background", "nodule")

    def sample(self, rng, n, grid, options):
        lat = _common_system(rng, n)
        over_gain = _forced_or_balanced(rng, n, options, "over_gain", 2)
        hypo = _forced_or_balanced(rng, n, options, "hypoechoic", 2)
        lat["over_gain"] = over_gain.astype(np.int64)
        lat["gain_db"] = (np.where(over_gain == 1, 1.0, -1.0) * rng.uniform(3.0, 10.0, n)).astype(np.float32)
        lat["hypoechoic"] = hypo.astype(np.int64)
        lat["nodule_contrast_db"] = np.where(hypo == 1, rng.uniform(-14.0, -6.0, n), rng.uniform(5.0, 9.0, n))
        side = rng.choice([-1.0, 1.0], n)
        lat["side"] = side
        lat["skin_mm"] = rng.uniform(0.6, 1.0, n)
        lat["fat_mm"] = rng.uniform(2.5, 4.0, n)
        lat["strap_mm"] = lat["fat_mm"] + rng.uniform(3.0, 4.5, n)
        lat["trachea_r_mm"] = rng.uniform(8.0, 10.0, n)
        lat["trachea_x_mm"] = side * rng.uniform(15.0, 19.0, n)
        lat["trachea_y_mm"] = lat["strap_mm"] + lat["trachea_r_mm"] + rng.uniform(1.0, 3.0, n)
        lat["lobe_a_mm"] = rng.uniform(9.0, 12.0, n)
        lat["lobe_b_mm"] = rng.uniform(6.5, 8.5, n)
        lat["lobe_x_mm"] = lat["trachea_x_mm"] - side * (lat["trachea_r_mm"] + 0.7 * lat["lobe_a_mm"])
        lat["lobe_y_mm"] = lat["strap_mm"] + lat["lobe_b_mm"] + rng.uniform(0.3, 1.5, n)
        lat["carotid_r_mm"] = rng.uniform(3.0, 4.0, n)
        lat["carotid_x_mm"] = lat["lobe_x_mm"] - side * (lat["lobe_a_mm"] + lat["carotid_r_mm"] - 1.0)
        lat["carotid_y_mm"] = lat["lobe_y_mm"] + rng.uniform(0.0, 3.0, n)
        lat["jugular_a_mm"] = rng.uniform(3.0, 6.0, n)
        lat["jugular_b_mm"] = rng.uniform(1.5, 3.5, n)
        lat["jugular_x_mm"] = lat["carotid_x_mm"] - side * rng.uniform(2.0, 5.0, n)
        lat["jugular_y_mm"] = lat["carotid_y_mm"] - lat["carotid_r_mm"] - lat["jugular_b_mm"] - rng.uniform(0.5, 2.0, n)
        # Nodule inside the lobe, at most 70 % of its size.
        angle = rng.uniform(0, 2 * np.pi, n)
        reach = rng.uniform(0.0, 0.35, n)
        lat["nodule_x_mm"] = lat["lobe_x_mm"] + reach * lat["lobe_a_mm"] * np.cos(angle)
        lat["nodule_y_mm"] = lat["lobe_y_mm"] + reach * lat["lobe_b_mm"] * np.sin(angle)
        room = np.minimum(lat["lobe_a_mm"], lat["lobe_b_mm"]) * (1 - reach)
        lat["nodule_a_mm"] = np.minimum(rng.uniform(2.8, 6.0, n), 0.7 * room)
        lat["nodule_b_mm"] = lat["nodule_a_mm"] * rng.uniform(0.7, 1.1, n)
        lat["nodule_tilt"] = rng.uniform(-0.5, 0.5, n)
        lat["_margin_orders"] = np.stack([rng.integers(2, 5, n), rng.integers(3, 7, n)], axis=1).astype(np.float32)
        lat["_margin_amplitudes"] = rng.uniform(0.02, 0.07, (n, 2)).astype(np.float32)
        lat["_margin_phases"] = rng.uniform(0, 2 * np.pi, (n, 2)).astype(np.float32)
        lat["halo"] = (rng.random(n) < 0.4).astype(np.int64)
        lat["calcification"] = (rng.random(n) < 0.25).astype(np.int64)
        lat["calc_x_mm"] = lat["nodule_x_mm"] + rng.uniform(-0.4, 0.4, n) * lat["nodule_a_mm"]
        lat["calc_y_mm"] = lat["nodule_y_mm"] + rng.uniform(-0.4, 0.4, n) * lat["nodule_b_mm"]
        return lat

    def geometry(self, lat, x, y):
        u, v = rotate(x, y, col(lat["nodule_x_mm"]), col(lat["nodule_y_mm"]), col(lat["nodule_tilt"]))
        nodule = harmonic_distance(
            u, v, col(lat["nodule_a_mm"]), col(lat["nodule_b_mm"]),
            lat["_margin_orders"], lat["_margin_amplitudes"], lat["_margin_phases"],
        )
        return {"nodule": nodule}

    def scene_maps(self, rng, lat, grid, geo):
        n = lat["gain_db"].shape[0]
        x, y = grid.scene_x_mm, grid.scene_y_mm
        alpha0 = self.probe.attenuation_db_per_mm
        texture = _texture(rng, n, grid, (12, 12))
        fibres = _texture(rng, n, grid, (30, 12))

        # Deep neck tissue, strap muscles (dark with fascia lines), subcutaneous fat and skin.
        echo = np.float32(-6.0) + 3.0 * texture + 2.0 * fibres
        strap = ramp(col(lat["strap_mm"]) - y, 0.5)
        echo = blend(echo, -11.0 + 2.0 * fibres, strap)
        fascia = ramp(0.35 - np.abs(y - col(lat["strap_mm"])), 0.3) + ramp(0.35 - np.abs(y - col(lat["fat_mm"])), 0.3)
        echo = blend(echo, 6.0, np.minimum(fascia, 1.0))
        echo = blend(echo, -8.0 + 2.5 * texture, ramp(col(lat["fat_mm"]) - y, 0.5))
        echo = blend(echo, 8.0, ramp(col(lat["skin_mm"]) - y, 0.3) * ramp(y - 0.25, 0.2))
        echo = blend(echo, -25.0, ramp(0.25 - y, 0.2))
        attenuation = np.full(echo.shape, alpha0, np.float32)
        # Longus colli behind the lobe.
        side = col(lat["side"])
        longus = ramp(ellipse_distance(x - col(lat["lobe_x_mm"]) - 3 * side, y - col(lat["lobe_y_mm"]) - col(lat["lobe_b_mm"]) - 4.0, np.float32(8.0), np.float32(3.5)), 0.8)
        echo = blend(echo, -10.0 + 2.0 * fibres, longus)
        # Thyroid lobe: homogeneous, brighter than muscle, with a thin bright capsule.
        lobe = ellipse_distance(x - col(lat["lobe_x_mm"]), y - col(lat["lobe_y_mm"]), col(lat["lobe_a_mm"]), col(lat["lobe_b_mm"]))
        gland_db = np.float32(3.0) + 1.2 * texture
        echo = blend(echo, 7.0, ramp(lobe + 0.4, 0.3) * ramp(0.2 - lobe, 0.3))
        echo = blend(echo, gland_db, ramp(lobe - 0.2, 0.4))
        # Carotid artery and jugular vein: anechoic lumens, the artery with a bright wall.
        carotid = ellipse_distance(x - col(lat["carotid_x_mm"]), y - col(lat["carotid_y_mm"]), col(lat["carotid_r_mm"]), col(lat["carotid_r_mm"]))
        echo = blend(echo, 9.0, ramp(carotid + 0.6, 0.3) * ramp(-carotid, 0.3))
        jugular = ellipse_distance(x - col(lat["jugular_x_mm"]), y - col(lat["jugular_y_mm"]), col(lat["jugular_a_mm"]), col(lat["jugular_b_mm"]))
        lumen = np.maximum(ramp(carotid, 0.3), ramp(jugular, 0.3))
        echo = blend(echo, FLUID_DB, lumen)
        attenuation = blend(attenuation, FLUID_ATTENUATION, lumen)
        # Trachea: bright air-mucosa arc, reverberation lines and a dense shadow behind it.
        tu, tv = x - col(lat["trachea_x_mm"]), y - col(lat["trachea_y_mm"])
        r = col(lat["trachea_r_mm"])
        trachea = ellipse_distance(tu, tv, r, r)
        cartilage = ramp(trachea + 1.6, 0.4) * ramp(-trachea - 0.4, 0.4) * (tv < 0)
        echo = blend(echo, -14.0, cartilage)
        air_line = ramp(trachea, 0.3) * ramp(0.8 - trachea, 0.3) * (tv < 0)
        echo = blend(echo, 20.0, air_line)
        behind = ramp(trachea - 0.8, 0.3)
        top = col(lat["trachea_y_mm"]) - r
        # Reverberation: echoes of the air line repeat at multiples of its depth, fading.
        reverb = np.full(echo.shape, -22.0, np.float32)
        for k in (2, 3):
            reverb = blend(reverb, 10.0 - 8.0 * (k - 2), ramp(0.4 - np.abs(y - k * top), 0.3))
        echo = blend(echo, reverb, behind)
        attenuation = blend(attenuation, 1.2, behind)

        # Nodule: contrast relative to the gland, optional dark halo, optional calcification with a small shadow.
        nodule = geo["nodule"]
        inside = ramp(nodule, 0.3)
        halo = ramp(-nodule + 0.1, 0.25) * ramp(nodule + 0.9, 0.25) * col(lat["halo"])
        echo = blend(echo, -8.0, halo)
        echo = blend(echo, gland_db + col(lat["nodule_contrast_db"]) + 1.5 * texture, inside)
        calc = ramp(0.45 - np.hypot(x - col(lat["calc_x_mm"]), y - col(lat["calc_y_mm"])), 0.2) * col(lat["calcification"])
        echo = blend(echo, 16.0, calc)
        attenuation = attenuation + np.float32(3.0) * calc
        return echo, attenuation

    def label_map(self, geo):
        return (geo["nodule"] > 0).astype(np.uint8)


# --- vessels ---------------------------------------------------------------------------------------


class Vessels(Organ):
    """Transverse view of an artery and its companion vein in muscle, scanned with a linear probe.

    Latent factors: the vessel layout (positions, vein size and compression, nerve) and the artery lumen
    (centre and radius), which defines the near- and far-wall key points of the lumen diameter.
    """

    name = "vessel"
    probe = Probe(kind="linear", fov_mm=30.0, psf_axial_mm=0.18, psf_lateral_mm=0.38, attenuation_db_per_mm=0.5, focus_mm=14.0)
    class_names = ("background", "artery", "vein")

    def sample(self, rng, n, grid, options):
        lat = _common_system(rng, n)
        lat["fat_mm"] = rng.uniform(3.0, 6.0, n)
        lat["fat_wave_mm"] = rng.uniform(0.3, 1.2, n)
        lat["fat_period_mm"] = rng.uniform(12.0, 30.0, n)
        lat["fat_phase"] = rng.uniform(0, 2 * np.pi, n)
        lat["fascia_mm"] = rng.uniform(21.0, 26.0, n)
        r_a = rng.uniform(3.0, 4.5, n)
        lat["artery_r_mm"] = r_a
        lat["artery_wall_mm"] = rng.uniform(0.6, 0.9, n)
        lat["artery_x_mm"] = rng.uniform(-6.0, 6.0, n)
        lat["artery_y_mm"] = np.maximum(rng.uniform(10.0, 17.0, n), lat["fat_mm"] + r_a + 2.5)
        a_v = rng.uniform(3.0, 5.5, n)
        lat["vein_a_mm"] = a_v
        lat["vein_b_mm"] = a_v * rng.uniform(0.45, 0.95, n)
        side = rng.choice([-1.0, 1.0], n)
        offset = r_a + a_v + rng.uniform(0.5, 3.0, n)
        # Keep the vein inside the image: put it on the other side when it would cross the edge.
        fits = np.abs(lat["artery_x_mm"] + side * offset) + a_v < 14.0
        side = np.where(fits, side, -side)
        lat["vein_x_mm"] = lat["artery_x_mm"] + side * offset
        lat["vein_y_mm"] = lat["artery_y_mm"] + rng.uniform(-2.5, 2.5, n)
        lat["nerve"] = (rng.random(n) < 0.6).astype(np.int64)
        lat["nerve_x_mm"] = lat["artery_x_mm"] - side * (r_a + rng.uniform(3.0, 5.0, n))
        lat["nerve_y_mm"] = lat["artery_y_mm"] + rng.uniform(-3.0, 2.0, n)
        lumen = r_a - lat["artery_wall_mm"]
        lat["lumen_diameter_mm"] = 2 * lumen
        px, py1 = grid.mm_to_px(lat["artery_x_mm"], lat["artery_y_mm"] - lumen)
        _, py2 = grid.mm_to_px(lat["artery_x_mm"], lat["artery_y_mm"] + lumen)
        lat["point_1_x_px"], lat["point_1_y_px"] = px, py1
        lat["point_2_x_px"], lat["point_2_y_px"] = px, py2
        return lat

    def geometry(self, lat, x, y):
        r = col(lat["artery_r_mm"])
        artery = ellipse_distance(x - col(lat["artery_x_mm"]), y - col(lat["artery_y_mm"]), r, r)
        vein = ellipse_distance(x - col(lat["vein_x_mm"]), y - col(lat["vein_y_mm"]), col(lat["vein_a_mm"]), col(lat["vein_b_mm"]))
        return {"artery": artery, "vein": vein}

    def scene_maps(self, rng, lat, grid, geo):
        n = lat["gain_db"].shape[0]
        x, y = grid.scene_x_mm, grid.scene_y_mm
        alpha0 = self.probe.attenuation_db_per_mm
        texture = _texture(rng, n, grid, (10, 10))
        fibres = _texture(rng, n, grid, (34, 12))

        # Muscle with bright perimysium, fascia lines, subcutaneous fat and skin.
        striation = np.sin(np.float32(2 * np.pi / 1.4) * y + 1.2 * fibres)
        echo = np.float32(-6.0) + 1.5 * texture + np.float32(6.0) * (striation > 0.75)
        deep = ramp(y - col(lat["fascia_mm"]) - 1.5 * texture, 0.6)
        echo = blend(echo, -3.0 + 3.0 * texture, deep)
        fascia_line = ramp(0.35 - np.abs(y - col(lat["fascia_mm"]) - 1.5 * texture), 0.3)
        fat_bottom = _wave(x, lat["fat_mm"], lat["fat_wave_mm"], lat["fat_period_mm"], lat["fat_phase"])
        fascia_line = np.maximum(fascia_line, ramp(0.35 - np.abs(y - fat_bottom), 0.3))
        echo = blend(echo, 9.0, fascia_line)
        septa = np.abs(np.sin(np.float32(2 * np.pi / 4.0) * (x + 0.6 * y) + 2.0 * texture)) > 0.96
        echo = blend(echo, -10.0 + 2.0 * texture + 8.0 * septa, ramp(fat_bottom - y, 0.5))
        echo = blend(echo, 8.0, ramp(0.9 - y, 0.3) * ramp(y - 0.25, 0.2))
        echo = blend(echo, -25.0, ramp(0.25 - y, 0.2))
        # Nerve: a bright oval with dark fascicles (honeycomb).
        nerve = ramp(ellipse_distance(x - col(lat["nerve_x_mm"]), y - col(lat["nerve_y_mm"]), np.float32(2.6), np.float32(1.8)), 0.4)
        fascicles = np.sin(np.float32(2 * np.pi / 0.9) * x) * np.sin(np.float32(2 * np.pi / 0.9) * y) > 0.4
        echo = blend(echo, 5.0 - 12.0 * fascicles, nerve * col(lat["nerve"]))
        attenuation = np.full(echo.shape, alpha0, np.float32)

        # Artery: bright intima-media ring around an anechoic lumen. Vein: thin wall, faint echoes in the lumen.
        artery, vein = geo["artery"], geo["vein"]
        wall = col(lat["artery_wall_mm"])
        echo = blend(echo, 10.0 + texture, ramp(artery, 0.3))
        echo = blend(echo, 3.0, ramp(vein + 0.3, 0.25))
        lumen = np.maximum(ramp(artery - wall, 0.25), ramp(vein, 0.25))
        echo = blend(echo, np.where(vein > 0, -24.0 + 2.0 * texture, np.float32(FLUID_DB)), lumen)
        attenuation = blend(attenuation, FLUID_ATTENUATION, lumen)
        return echo, attenuation

    def label_map(self, geo):
        labels = (geo["vein"] > 0).astype(np.uint8) * 2
        labels[np.broadcast_to(geo["artery"] > 0, labels.shape)] = 1
        return labels


ORGANS: dict[str, Organ] = {organ.name: organ for organ in (Breast(), FetalHead(), Heart(), Thyroid(), Vessels())}
