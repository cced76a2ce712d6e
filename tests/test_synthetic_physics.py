"""Image formation, scenes and targets of the synthetic benchmark, checked against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.integrate import quad

from usagg.data.synthetic.geometry import ramanujan_perimeter
from usagg.data.synthetic.organs import ORGANS, Breast, FetalHead, Heart, Thyroid
from usagg.data.synthetic.render import tight_boxes
from usagg.data.synthetic.speckle import (
    FLOOR_DB,
    Probe,
    form_bmode,
    scan_grid,
    speckle_iq,
    speckle_power,
)

LINEAR = Probe(kind="linear", fov_mm=64.0, psf_axial_mm=1.5, psf_lateral_mm=2.5, attenuation_db_per_mm=0.3, focus_mm=32.0)


def test_speckle_envelope_is_rayleigh():
    rng = np.random.default_rng(0)
    iq = speckle_iq(rng, np.ones((4, 128, 128), np.float32), (1.5, 2.5))
    envelope = np.sqrt(iq[0] ** 2 + iq[1] ** 2).ravel()
    # Rayleigh: mean / std = sqrt(pi / (4 - pi)) = 1.913 and E[A^2] / E[A]^2 = 4 / pi.
    assert envelope.mean() / envelope.std() == pytest.approx(math.sqrt(math.pi / (4 - math.pi)), rel=0.03)
    assert np.mean(envelope**2) / envelope.mean() ** 2 == pytest.approx(4 / math.pi, rel=0.03)


def test_speckle_power_follows_backscatter():
    rng = np.random.default_rng(1)
    amplitude = np.ones((4, 128, 128), np.float32)
    amplitude[:, :, 64:] = math.sqrt(10.0)  # +10 dB backscatter in the right half
    power = speckle_power(rng, amplitude, (1.0, 1.5))
    ratio = power[:, :, 72:].mean() / power[:, :, :56].mean()
    assert ratio == pytest.approx(10.0, rel=0.08)
    assert power[:, :, :56].mean() == pytest.approx(2.0, rel=0.08)  # unit-energy PSF, two unit-variance parts


def test_attenuating_block_casts_shadow_of_known_depth():
    grid = scan_grid(LINEAR, 64)  # 1 mm pixels
    shape = (64, 64, 64)
    echo = np.zeros(shape, np.float32)
    attenuation = np.full(shape, LINEAR.attenuation_db_per_mm, np.float32)
    attenuation[:, 10:20, 8:24] += 0.5  # 10 mm block: 2 x 0.5 x 10 = 10 dB extra two-way loss below it
    attenuation[:, 10:20, 40:56] = 0.0  # fluid: 2 x 0.3 x 10 = 6 dB less loss below it (enhancement)
    ones = np.ones(64, np.float32)
    images = form_bmode(np.random.default_rng(2), grid, echo, attenuation, gain_db=0 * ones, tgc_fraction=ones).astype(float)
    per_db = 255.0 / LINEAR.dynamic_range_db
    reference = images[:, 30:50, 28:36].mean()
    shadow = images[:, 30:50, 10:22].mean()
    enhancement = images[:, 30:50, 42:54].mean()
    assert (reference - shadow) / per_db == pytest.approx(10.0, abs=1.0)
    assert (enhancement - reference) / per_db == pytest.approx(6.0, abs=1.0)
    assert reference > 10  # not clipped, so the differences above are exact in dB
    assert enhancement < 245
    assert FLOOR_DB < 0


def test_sector_scan_conversion_keeps_uniform_values():
    grid = scan_grid(FetalHead.probe, 96)
    assert grid.fov_mask[10, 48]
    assert grid.fov_mask[60, 48]
    assert not grid.fov_mask[0, 48]  # the convex probe face curves down from the top corners to 4.4 mm
    assert not grid.fov_mask[0, 0]
    assert not grid.fov_mask[95, 0]
    assert not grid.fov_mask[95, 95]
    from usagg.data.synthetic.speckle import _scan_convert

    display = np.full((2, 96, 96), 100.0, np.float32)
    out = _scan_convert(display, grid)
    assert set(np.unique(out[:, grid.fov_mask])) == {100}
    assert not out[:, ~grid.fov_mask].any()


@pytest.mark.parametrize("ratio", [1.0, 0.86, 0.74])
def test_ramanujan_perimeter_matches_integral(ratio):
    a, b = 40.0, 40.0 * ratio
    exact, _ = quad(lambda t: math.hypot(a * math.sin(t), b * math.cos(t)), 0, 2 * math.pi)
    assert ramanujan_perimeter(np.array(a), np.array(b)) == pytest.approx(exact, rel=1e-7)


def test_tight_boxes_known_mask():
    masks = np.zeros((2, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 0] = True
    assert tight_boxes(masks).tolist() == [[3, 2, 9, 5], [0, 9, 1, 10]]
    with pytest.raises(ValueError, match="empty"):
        tight_boxes(np.zeros((1, 4, 4), bool))


@pytest.mark.parametrize("organ", list(ORGANS))
def test_organ_render_labels_valid(organ):
    scene = ORGANS[organ].render(np.random.default_rng(3), 6, 64)
    assert scene.images.shape == (6, 64, 64)
    assert scene.images.dtype == np.uint8
    assert scene.label_maps.shape == (6, 64, 64)
    classes = len(ORGANS[organ].class_names)
    assert scene.label_maps.max() < classes
    grid = scan_grid(ORGANS[organ].probe, 64)
    assert not scene.label_maps[:, ~grid.fov_mask].any()
    for image in range(6):  # every labelled structure is in view
        assert set(np.unique(scene.label_maps[image])) == set(range(classes))
    assert scene.images[:, grid.fov_mask].std() > 5  # speckle and anatomy, not a flat image


def test_fetal_head_targets_agree_with_mask():
    size = 128
    scene = FetalHead().render(np.random.default_rng(4), 8, size)
    lat = scene.latents
    spacing = scene.spacing_mm
    for i in range(8):
        a, b = lat["head_a_mm"][i], lat["head_b_mm"][i]
        p1 = np.array([lat["point_1_x_px"][i], lat["point_1_y_px"][i]])
        p2 = np.array([lat["point_2_x_px"][i], lat["point_2_y_px"][i]])
        assert p1[0] <= p2[0]
        assert np.linalg.norm(p2 - p1) == pytest.approx(2 * a / spacing, rel=1e-6)
        mask = scene.label_maps[i] > 0
        assert mask.sum() * spacing**2 == pytest.approx(math.pi * a * b, rel=0.05)
        centre = (p1 + p2) / 2
        for point in (p1, p2):  # end points lie on the mask boundary: just inside in, just outside out
            direction = (point - centre) / np.linalg.norm(point - centre)
            inner = np.round(point - 2 * direction).astype(int)
            outer = np.round(point + 2 * direction).astype(int)
            assert mask[inner[1], inner[0]]
            assert not mask[outer[1], outer[0]]
        assert lat["hc_mm"][i] == pytest.approx(ramanujan_perimeter(a, b))


def test_vessel_keypoints_span_artery_lumen():
    scene = ORGANS["vessel"].render(np.random.default_rng(5), 8, 128)
    lat = scene.latents
    for i in range(8):
        x1, y1, y2 = lat["point_1_x_px"][i], lat["point_1_y_px"][i], lat["point_2_y_px"][i]
        assert (y2 - y1) * scene.spacing_mm == pytest.approx(lat["lumen_diameter_mm"][i], rel=1e-6)
        assert scene.label_maps[i, round((y1 + y2) / 2), round(x1)] == 1  # midpoint is in the artery


def test_class_labels_follow_their_rules():
    rng = np.random.default_rng(6)
    breast = Breast().render(rng, 32, 64).latents
    assert np.array_equal(breast["malignant"] == 1, breast["irregularity"] > Breast.IRREGULARITY_THRESHOLD)
    heart = Heart().render(rng, 32, 64).latents
    assert np.array_equal(heart["lv_dilated"] == 1, heart["lv_scale"] > Heart.DILATION_THRESHOLD)
    thyroid = Thyroid().render(rng, 32, 64).latents
    assert np.array_equal(thyroid["hypoechoic"] == 1, thyroid["nodule_contrast_db"] < 0)
    assert np.array_equal(thyroid["over_gain"] == 1, thyroid["gain_db"] > 0)
    for labels in (breast["malignant"], heart["lv_dilated"], thyroid["hypoechoic"], thyroid["over_gain"]):
        assert labels.sum() == 16  # balanced within a chunk


def test_thyroid_gain_changes_brightness_not_nodule_contrast():
    """The designed conflict: gain moves absolute brightness, echogenicity is relative to the gland."""
    rng = np.random.default_rng(7)
    thyroid = Thyroid()
    over = thyroid.render(rng, 16, 96, {"over_gain": np.ones(16, int)})
    under = thyroid.render(rng, 16, 96, {"over_gain": np.zeros(16, int)})
    assert over.images.mean() > under.images.mean() + 20
