"""Tests of the augmentation recipes on real photos (skimage.data), against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from skimage import data as skdata

from contrastive_jax.data import augment as A

SIZE = 32


@pytest.fixture(scope="module")
def photos():
  # Downscaled so that every op stays cheap; still real, non-square photos.
  out = {}
  for name in ("astronaut", "chelsea", "coffee"):
    im = getattr(skdata, name)()
    out[name] = tf.image.resize(im, [im.shape[0] // 4, im.shape[1] // 4],
                                antialias=True).numpy().round().astype(np.uint8)
  return out


def _views(image, cfg, seed=0, example=0, epoch=0):
  ex = A.example_seed(seed, epoch, example)
  v1, v2 = A.two_views(tf.constant(image), ex, cfg)
  return v1.numpy(), v2.numpy()


@pytest.mark.parametrize("recipe", A.RECIPES)
def test_shapes_dtype_range(photos, recipe):
  cfg = A.recipe_config(recipe, SIZE, {"normalize": None, "blur": True})
  for k, (name, im) in enumerate(photos.items()):
    v1, v2 = _views(im, cfg, example=k)
    for v in (v1, v2):
      assert v.shape == (SIZE, SIZE, 3) and v.dtype == np.float32
      assert v.min() >= 0.0 and v.max() <= 1.0
    if recipe != "clip" or name == "astronaut":
      # (A (0.9, 1) crop of a wide photo cannot meet the aspect range: torchvision's
      # fallback, the deterministic centre crop, is then the only view CLIP can make.)
      assert not np.allclose(v1, v2), "the two views of an image must differ"
    ev = A.eval_preprocess(tf.constant(im), cfg).numpy()
    assert ev.shape == (SIZE, SIZE, 3) and ev.dtype == np.float32
    assert 0.0 <= ev.min() and ev.max() <= 1.0


def test_normalisation_matches_formula(photos):
  im = photos["chelsea"]
  raw = A.recipe_config("clip", SIZE, {"normalize": None})
  norm = A.recipe_config("clip", SIZE)
  a = A.eval_preprocess(tf.constant(im), raw).numpy().astype(np.float64)
  b = A.eval_preprocess(tf.constant(im), norm).numpy()
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(b, (a - mean) / std, atol=1e-5)


def test_same_seed_same_views_other_seed_other_views(photos):
  cfg = A.recipe_config("simclr", SIZE, {"blur": True})
  im = photos["astronaut"]
  a = _views(im, cfg, seed=3, example=5)
  b = _views(im, cfg, seed=3, example=5)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  for other in (_views(im, cfg, seed=4, example=5), _views(im, cfg, seed=3, example=6),
                _views(im, cfg, seed=3, example=5, epoch=1)):
    assert not np.allclose(a[0], other[0])


def _boxes(h, w, area, aspect, n=400):
  fn = tf.function(lambda i: A.sample_crop_box(A.example_seed(0, 0, i), h, w, area, aspect))
  ds = tf.data.Dataset.range(n).map(fn).batch(n)
  return next(iter(ds)).numpy()


@pytest.mark.parametrize("area", [(0.08, 1.0), (0.2, 1.0), (0.9, 1.0)])
def test_crop_area_spans_range(area):
  h, w = 120, 160
  boxes = _boxes(h, w, area, (3 / 4, 4 / 3))
  top, left, ch, cw = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + ch <= h).all() and (left + cw <= w).all()
  frac = ch * cw / (h * w)
  # Rounding the sides to whole pixels moves the area by at most ~2 pixels of side.
  tol = 2 * (h + w) / (h * w)
  assert frac.min() >= area[0] - tol and frac.max() <= 1.0
  span = area[1] - area[0]
  assert frac.min() < area[0] + 0.05 * span + tol, frac.min()
  assert frac.max() > area[1] - 0.15 * span - tol, frac.max()
  # (The accepted areas are not uniform: large proposals with an extreme aspect do not fit
  # and are redrawn, exactly as in torchvision's RandomResizedCrop.)
  ratio = cw / ch
  assert ratio.min() >= 0.75 * (1 - 0.05) and ratio.max() <= 4 / 3 * (1 + 0.05)


def test_grayscale_has_equal_channels(photos):
  cfg = A.recipe_config("simclr", SIZE, {"grayscale_prob": 1.0})
  v1, v2 = _views(photos["coffee"], cfg)
  for v in (v1, v2):
    np.testing.assert_allclose(v[..., 0], v[..., 1], atol=1e-6)
    np.testing.assert_allclose(v[..., 0], v[..., 2], atol=1e-6)
  # Luma weights of ITU-R 601 against a float64 reference.
  x = photos["coffee"].astype(np.float64) / 255
  ref = x @ np.array([0.2989, 0.587, 0.114])
  got = A.to_grayscale(tf.constant(x, tf.float32)).numpy()
  np.testing.assert_allclose(got[..., 1], ref, atol=1e-3)


def test_jitter_strength_zero_is_identity(photos):
  x = tf.constant(photos["chelsea"].astype(np.float32) / 255)
  out = A.color_jitter(x, A.example_seed(0, 0, 0), 0.0, 0.0, 0.0, 0.0)
  np.testing.assert_array_equal(out.numpy(), x.numpy())
  # A whole recipe at strength 0 without crop/flip/gray/blur leaves the resized crop alone.
  base = dict(flip_prob=0.0, grayscale_prob=0.0, blur=False, jitter_prob=1.0,
              crop_area=(1.0, 1.0), crop_aspect=(1.0, 1.0), normalize=None)
  im = photos["astronaut"]  # square, so a (1, 1) crop is the whole image
  s0 = A.recipe_config("simclr", SIZE, dict(base, strength=0.0))
  off = A.recipe_config("simclr", SIZE, dict(base, jitter_prob=0.0))
  np.testing.assert_array_equal(_views(im, s0)[0], _views(im, off)[0])
  s1 = A.recipe_config("simclr", SIZE, dict(base, strength=1.0))
  assert np.abs(_views(im, s1)[0] - _views(im, off)[0]).max() > 0.01


def test_colour_ops_match_numpy_reference(photos):
  x64 = photos["coffee"].astype(np.float64) / 255
  x = tf.constant(x64, tf.float32)
  gray = (x64 @ np.array([0.2989, 0.587, 0.114]))[..., None]
  np.testing.assert_allclose(A.adjust_brightness(x, 1.3).numpy(), x64 * 1.3, atol=1e-5)
  np.testing.assert_allclose(A.adjust_saturation(x, 0.4).numpy(),
                             gray + 0.4 * (x64 - gray), atol=1e-3)
  np.testing.assert_allclose(A.adjust_contrast(x, 1.5).numpy(),
                             gray.mean() + 1.5 * (x64 - gray.mean()), atol=1e-3)
  np.testing.assert_allclose(A.solarize(x).numpy(), np.where(x64 < 0.5, x64, 1 - x64),
                             atol=1e-6)


def _np_blur(x, sigma, radius):
  k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  k /= k.sum()
  p = np.pad(x, [(radius, radius), (radius, radius), (0, 0)], mode="reflect")
  h, w, _ = x.shape
  rows = sum(k[i] * p[i:i + h] for i in range(2 * radius + 1))
  return sum(k[j] * rows[:, j:j + w] for j in range(2 * radius + 1))


def test_gaussian_blur_matches_numpy_reference(photos):
  x64 = photos["chelsea"][:40, :50].astype(np.float64) / 255
  got = A.gaussian_blur(tf.constant(x64, tf.float32), 1.5, 7).numpy()
  np.testing.assert_allclose(got, _np_blur(x64, 1.5, 3), atol=1e-5)


def test_asymmetric_recipe_probabilities():
  cfg = A.recipe_config("byol", 224)
  assert cfg.blur_prob == (1.0, 0.1) and cfg.solarize_prob == (0.0, 0.2)
  assert (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) == (0.4, 0.4, 0.2, 0.1)
  simclr = A.recipe_config("simclr", 224, {"strength": 0.5})
  assert math.isclose(simclr.brightness, 0.4) and math.isclose(simclr.hue, 0.1)
  assert A.recipe_config("simclr", 32).blur_prob == (0.0, 0.0)  # off for CIFAR-sized images
  assert A.recipe_config("mocov2", 224).crop_area == (0.2, 1.0)
  with pytest.raises(ValueError, match="unknown data.augment keys"):
    A.recipe_config("simclr", 32, {"brightnes": 0.1})
  with pytest.raises(ValueError, match="data.recipe"):
    A.recipe_config("swav", 32)


def test_view1_always_blurred_in_byol(photos):
  """BYOL view 1 has blur p=1: a flat-jitter, no-crop view equals the blurred image."""
  over = dict(flip_prob=0.0, grayscale_prob=0.0, jitter_prob=0.0, crop_area=(1.0, 1.0),
              crop_aspect=(1.0, 1.0), normalize=None, solarize_prob=0.0)
  im = photos["astronaut"]
  blurred = A.recipe_config("byol", SIZE, dict(over, blur=True))
  plain = A.recipe_config("byol", SIZE, dict(over, blur=False))
  for ex in range(3):
    v_blur = _views(im, blurred, example=ex)[0]
    v_plain = _views(im, plain, example=ex)[0]
    assert not np.allclose(v_blur, v_plain)
    # Blur lowers the high-frequency energy.
    assert np.abs(np.diff(v_blur, axis=0)).mean() < np.abs(np.diff(v_plain, axis=0)).mean()


def test_solarize_min_form_is_bit_identical_to_the_threshold_form():
  # Every float32 in [0, 1] near the threshold, plus a grid: min(x, 1 - x) == where(x < 0.5).
  near = np.nextafter(np.float32(0.5), np.float32([0.0, 1.0]))
  x = np.concatenate([np.linspace(0, 1, 4097, dtype=np.float32), near,
                      np.float32([0.5, 0.0, 1.0])]).reshape(-1, 1, 1) * np.ones(3, np.float32)
  ref = np.where(x < 0.5, x, np.float32(1) - x)
  np.testing.assert_array_equal(A.solarize(tf.constant(x)).numpy(), ref)
  np.testing.assert_array_equal(A.solarize(tf.constant(x), 0.3).numpy(),
                                np.where(x < 0.3, x, np.float32(1) - x))
