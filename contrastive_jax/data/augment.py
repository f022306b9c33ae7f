"""Image augmentations of the contrastive recipes, as stateless TensorFlow ops for tf.data.

Recipes (parameters from the papers and their reference code, cited with each recipe):

* ``simclr`` (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
  Representations", Appendix A): random resized crop, area U(0.08, 1), aspect log-uniform in
  (3/4, 4/3), bicubic resize; horizontal flip p=0.5; colour jitter p=0.8 with brightness,
  contrast, saturation 0.8 s and hue 0.2 s in a random order, clipped to [0, 1] after every op;
  grayscale p=0.2; Gaussian blur p=0.5, sigma U(0.1, 2.0), kernel 10% of the side (off for
  CIFAR-sized images). No mean/std normalisation.
* ``mocov2`` (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning"): crop
  area (0.2, 1); jitter (0.4, 0.4, 0.4, 0.1) p=0.8; grayscale 0.2; blur 0.5; flip; ImageNet
  mean/std.
* ``mocov3`` / ``byol`` (Chen et al. 2021 "An Empirical Study of Training Self-Supervised Vision
  Transformers"; Grill et al. 2020, Table 6): asymmetric. Both views crop (0.08, 1), jitter
  (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2; view 1 blur p=1.0; view 2 blur p=0.1, solarize 0.2.
* ``clip`` (open_clip training transform): random resized crop (0.9, 1) bicubic only; eval
  short-side resize and centre crop; OpenAI mean/std.

Brightness is multiplicative, ``x * U[max(0, 1 - b), 1 + b]``: this is what SimCLR's TF code
does by default (``impl='simclrv2'``) and what torchvision's ``ColorJitter`` (MoCo, BYOL-style
PyTorch code) does, so one definition serves every recipe; the additive SimCLR v1 variant
(``x + U[-b, b]``) is available with ``brightness_mode="additive"``.

Contrast and saturation follow torchvision: contrast blends with the mean of the grayscale
image, saturation blends with the grayscale image (both with factor ``U[max(0, 1 - c), 1 + c]``);
hue rotates the hue channel by ``U[-h, h]`` of a full turn (``tf.image.adjust_hue``).

Randomness: every random choice is a ``tf.random.stateless_*`` op whose seed is derived from
(run seed, epoch, example id, view) by ``example_seed``/``view_seed`` and then folded with a
fixed constant per op. A view is therefore a pure function of those four integers: the same
under any tf.data parallelism, any number of hosts, and after a resume.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}

RECIPES = ("simclr", "mocov2", "mocov3", "byol", "clip")

# Fixed per-op constants folded into a view seed so that each op draws independent numbers.
_OP_CROP, _OP_FLIP, _OP_JITTER, _OP_GRAY, _OP_BLUR, _OP_SOLARIZE = 11, 12, 13, 14, 15, 16
_ALG = "philox"  # explicit, so that the numbers do not depend on the device TF would pick.


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Parameters of one augmentation recipe; ``recipe_config`` fills the papers' defaults.

  Per-view probabilities are pairs ``(view 1, view 2)`` so that asymmetric recipes
  (MoCo v3, BYOL) and symmetric ones share one definition.
  """
  image_size: int = 224
  crop_area: tuple[float, float] = (0.08, 1.0)
  crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
  crop_attempts: int = 10
  resize_method: str = "bicubic"
  flip_prob: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.8
  contrast: float = 0.8
  saturation: float = 0.8
  hue: float = 0.2
  jitter_random_order: bool = True
  brightness_mode: str = "multiplicative"  # or "additive" (SimCLR v1)
  grayscale_prob: float = 0.2
  blur_prob: tuple[float, float] = (0.5, 0.5)
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  blur_kernel_fraction: float = 0.1
  solarize_prob: tuple[float, float] = (0.0, 0.0)
  solarize_threshold: float = 0.5
  normalize: str | None = None  # None | "imagenet" | "clip"
  eval_crop_fraction: float = 0.875  # centre crop for eval; 1.0 with "resize" = plain resize
  eval_mode: str = "center_crop"  # "center_crop" (short side to size / fraction) | "resize"

  def __post_init__(self):
    lo, hi = self.crop_area
    if not 0 < lo <= hi <= 1:
      raise ValueError(f"augment.crop_area={self.crop_area} must satisfy 0 < min <= max <= 1")
    if not 0 < self.crop_aspect[0] <= self.crop_aspect[1]:
      raise ValueError(f"augment.crop_aspect={self.crop_aspect} must be 0 < min <= max")
    if self.brightness_mode not in ("multiplicative", "additive"):
      raise ValueError(f"augment.brightness_mode={self.brightness_mode!r}; use "
                       "'multiplicative' or 'additive'")
    if self.normalize not in (None, *NORMALIZATIONS):
      raise ValueError(f"augment.normalize={self.normalize!r}; use None, 'imagenet' or 'clip'")
    if self.eval_mode not in ("center_crop", "resize"):
      raise ValueError(f"augment.eval_mode={self.eval_mode!r}; use 'center_crop' or 'resize'")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"augment.{name}={getattr(self, name)} must be in [0, 1]")


def recipe_config(recipe: str, image_size: int = 224,
                  overrides: Mapping[str, Any] | None = None) -> AugmentConfig:
  """The papers' defaults for ``recipe`` at ``image_size``, then ``overrides``.

  Extra override keys understood here (not fields): ``strength`` (SimCLR colour strength s:
  1.0 ImageNet, 0.5 CIFAR; sets brightness/contrast/saturation 0.8 s and hue 0.2 s) and
  ``blur`` (True / False / "auto"; "auto" turns blur off for images of 64 pixels or less, as
  SimCLR did on CIFAR). A scalar ``blur_prob``/``solarize_prob`` applies to both views.
  """
  if recipe not in RECIPES:
    raise ValueError(f"data.recipe={recipe!r} is unknown; use one of {RECIPES}")
  overrides = dict(overrides or {})
  small = image_size <= 64
  kw: dict[str, Any] = dict(image_size=image_size)
  if recipe == "simclr":
    s = float(overrides.pop("strength", 1.0))
    kw.update(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s,
              blur_prob=(0.5, 0.5))
  elif recipe == "mocov2":
    kw.update(crop_area=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
              blur_prob=(0.5, 0.5), normalize="imagenet")
  elif recipe in ("mocov3", "byol"):
    kw.update(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
              blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2), normalize="imagenet")
  elif recipe == "clip":
    kw.update(crop_area=(0.9, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0,
              blur_prob=(0.0, 0.0), normalize="clip", eval_crop_fraction=1.0)
  if recipe != "simclr" and "strength" in overrides:
    s = float(overrides.pop("strength"))
    for k in ("brightness", "contrast", "saturation", "hue"):
      kw[k] = kw.get(k, getattr(AugmentConfig, k)) * s
  blur = overrides.pop("blur", "auto")
  if blur is False or (blur == "auto" and small):
    kw["blur_prob"] = (0.0, 0.0)
  if small:
    kw["eval_mode"] = "resize"  # tiny images: a 0.875 crop would cut the digit / object
  for key in ("blur_prob", "solarize_prob"):
    if key in overrides and not isinstance(overrides[key], (tuple, list)):
      overrides[key] = (float(overrides[key]),) * 2
  for key in ("crop_area", "crop_aspect", "blur_prob", "solarize_prob", "blur_sigma"):
    if key in overrides:
      overrides[key] = tuple(float(v) for v in overrides[key])
  fields = {f.name for f in dataclasses.fields(AugmentConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown data.augment keys {sorted(unknown)}; valid keys are "
                     f"{sorted(fields | {'strength', 'blur'})}")
  kw.update(overrides)
  return AugmentConfig(**kw)


# ----------------------------------------------------------------------------- seeds

def _seed_tensor(seed) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  return tf.cast(seed, tf.int64)


def fold_in(seed, data) -> tf.Tensor:
  """A new ``[2] int64`` stateless seed from ``seed`` and an integer ``data``."""
  return tf.random.experimental.stateless_fold_in(
      _seed_tensor(seed), tf.cast(data, tf.int64), alg=_ALG)


def example_seed(run_seed: int, epoch, example_id) -> tf.Tensor:
  """``[2] int64`` seed of one example in one epoch, from the run seed, epoch and id."""
  base = tf.stack([tf.constant(run_seed, tf.int64), tf.constant(0x5EED, tf.int64)])
  return fold_in(fold_in(base, epoch), example_id)


def view_seed(ex_seed, view: int) -> tf.Tensor:
  """``[2] int64`` seed of view ``view`` (1 or 2) of an example."""
  return fold_in(ex_seed, view)


def _uniform(seed, op: int, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed=fold_in(seed, op), minval=minval,
                                     maxval=maxval, dtype=tf.float32, alg=_ALG)


def _coin(seed, op: int, prob: float) -> tf.Tensor:
  """A stateless Bernoulli(prob) draw as a scalar bool."""
  return _uniform(seed, op) < prob


# ----------------------------------------------------------------------------- crops

def sample_crop_box(seed, height, width, area_range=(0.08, 1.0),
                    aspect_range=(3 / 4, 4 / 3), attempts: int = 10) -> tf.Tensor:
  """Samples a random-resized-crop box ``[4] int32 (top, left, crop_h, crop_w)``.

  The Inception-style crop (Szegedy et al. 2015) as in torchvision's RandomResizedCrop:
  ``attempts`` proposals with area fraction U(area_range) and log-uniform aspect ratio
  w/h in aspect_range; the first that fits is taken at a uniform position; if none fits, a
  centre crop of the whole image with the aspect clamped to the range. All draws are made at
  once (vectorised) from the stateless ``seed``.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  seed = fold_in(seed, _OP_CROP)
  u = tf.random.stateless_uniform([4, attempts], seed=seed, dtype=tf.float32, alg=_ALG)
  area = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[0])
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  ratio = tf.exp(log_lo + (log_hi - log_lo) * u[1])
  cw = tf.round(tf.sqrt(area * ratio))
  ch = tf.round(tf.sqrt(area / ratio))
  ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  found = tf.reduce_any(ok)
  # Fallback: whole image, aspect clamped into the range (torchvision's behaviour).
  img_ratio = w / h
  fb_w = tf.where(img_ratio < aspect_range[0], w, tf.where(
      img_ratio > aspect_range[1], tf.round(h * aspect_range[1]), w))
  fb_h = tf.where(img_ratio < aspect_range[0], tf.round(w / aspect_range[0]), h)
  crop_w = tf.where(found, cw[first], fb_w)
  crop_h = tf.where(found, ch[first], fb_h)
  top = tf.where(found, tf.floor(u[2, first] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
  left = tf.where(found, tf.floor(u[3, first] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
  box = tf.stack([top, left, crop_h, crop_w])
  return tf.cast(box, tf.int32)


def _resize(image: tf.Tensor, size, method: str) -> tf.Tensor:
  out = tf.image.resize(image, size, method=method, antialias=False)
  # Bicubic overshoots; clipping keeps the documented [0, 1] range.
  return tf.clip_by_value(out, 0.0, 1.0)


def random_resized_crop(image: tf.Tensor, seed, cfg: AugmentConfig) -> tf.Tensor:
  """``[h, w, C] uint8|float`` -> ``[S, S, 3] float32`` crop of a sampled box, resized.

  The crop is taken before the conversion to float, so only its pixels are converted.
  """
  shape = tf.shape(image)
  box = sample_crop_box(seed, shape[0], shape[1], cfg.crop_area, cfg.crop_aspect,
                        cfg.crop_attempts)
  crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
  return _resize(_to_float(crop), [cfg.image_size, cfg.image_size], cfg.resize_method)


# ----------------------------------------------------------------------------- colour

# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale and torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _channel_matmul(image: tf.Tensor, matrix) -> tf.Tensor:
  """``[h, w, 3] @ [3, 3]`` per pixel, as one ``[h*w, 3] x [3, 3]`` matmul.

  The colour ops below are linear maps of each pixel's RGB vector. Written as one small
  matmul they cost one pass over the image; the elementwise forms broadcast along a
  3-wide last axis, which TensorFlow's CPU kernels do several times slower (profiled in
  benchmarks/input_pipeline.py --parts stages).
  """
  shape = tf.shape(image)
  out = tf.matmul(tf.reshape(image, [-1, 3]), tf.cast(matrix, image.dtype))
  return tf.reshape(out, shape)


def _gray_matrix(dtype=tf.float32) -> tf.Tensor:
  """``[3, 3]``: every output channel is the luma of the input pixel."""
  return tf.tile(tf.constant(_LUMA, dtype)[:, None], [1, 3])


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601 luma replicated to 3 channels, ``[h, w, 3]``."""
  return _channel_matmul(image, _gray_matrix())


def adjust_brightness(image, factor, mode: str = "multiplicative"):
  if mode == "multiplicative":
    return image * factor
  return image + factor


def adjust_contrast(image, factor):
  """Blend with the mean luma (torchvision's definition)."""
  mean = tf.reduce_mean(tf.image.rgb_to_grayscale(image))
  return mean + factor * (image - mean)


def adjust_saturation(image, factor):
  """Blend with the grayscale image (torchvision's definition).

  ``gray + f (x - gray)`` is the per-pixel linear map ``f I + (1 - f) G`` (``G`` the luma
  matrix), applied as one matmul.
  """
  factor = tf.cast(factor, tf.float32)
  matrix = factor * tf.eye(3) + (1.0 - factor) * _gray_matrix()
  return _channel_matmul(image, matrix)


def color_jitter(image: tf.Tensor, seed, brightness: float, contrast: float,
                 saturation: float, hue: float, random_order: bool = True,
                 brightness_mode: str = "multiplicative") -> tf.Tensor:
  """Colour jitter with the four ops in a random (stateless) order, clipped after each.

  Ops whose strength is 0 are left out at trace time, so strength 0 is exactly the identity.
  """
  seed = fold_in(seed, _OP_JITTER)
  ops = []
  if brightness > 0:
    if brightness_mode == "multiplicative":
      lo, hi = max(0.0, 1.0 - brightness), 1.0 + brightness
    else:
      lo, hi = -brightness, brightness
    ops.append(lambda x, s: adjust_brightness(x, _uniform(s, 1, (), lo, hi), brightness_mode))
  if contrast > 0:
    ops.append(lambda x, s: adjust_contrast(
        x, _uniform(s, 2, (), max(0.0, 1 - contrast), 1 + contrast)))
  if saturation > 0:
    ops.append(lambda x, s: adjust_saturation(
        x, _uniform(s, 3, (), max(0.0, 1 - saturation), 1 + saturation)))
  if hue > 0:
    ops.append(lambda x, s: tf.image.adjust_hue(x, _uniform(s, 4, (), -hue, hue)))
  if not ops:
    return image
  if random_order and len(ops) > 1:
    order = tf.argsort(_uniform(seed, 5, (len(ops),)))
  else:
    order = tf.range(len(ops))

  # One while_loop over the positions traces each op once (not once per position).
  def body(i, x):
    branches = [(lambda f=f: tf.clip_by_value(f(x, seed), 0.0, 1.0)) for f in ops]
    y = tf.switch_case(order[i], branches)
    return i + 1, tf.ensure_shape(y, x.shape)

  _, image = tf.while_loop(lambda i, x: i < len(ops), body, (tf.constant(0), image))
  return image


# ----------------------------------------------------------------------------- blur etc.

def gaussian_blur(image: tf.Tensor, sigma, kernel_size: int) -> tf.Tensor:
  """Separable Gaussian blur of ``[h, w, 3]`` with reflect padding; odd kernel ``2r+1``."""
  radius = max(kernel_size // 2, 1)
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  k = tf.exp(-0.5 * tf.square(x / tf.cast(sigma, tf.float32)))
  k = k / tf.reduce_sum(k)
  kh = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 3, 1])
  kw = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 3, 1])
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
  out = tf.nn.depthwise_conv2d(padded, kh, [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, kw, [1, 1, 1, 1], "VALID")
  return out[0]


def solarize(image: tf.Tensor, threshold: float = 0.5) -> tf.Tensor:
  """Pixels at or above ``threshold`` inverted (``x -> 1 - x``), for images in [0, 1]."""
  if threshold == 0.5:
    # On [0, 1], x < 0.5 exactly when x < 1 - x, so this is the same map in one op; 1 - x is
    # exact for x in [0.5, 1] (Sterbenz), so the values are bit-identical to the tf.where.
    return tf.minimum(image, 1.0 - image)
  return tf.where(image < threshold, image, 1.0 - image)


def normalize(image: tf.Tensor, which: str | None) -> tf.Tensor:
  """``(x - mean) / std`` per channel, as ``x @ diag(1 / std) + (-mean / std)``."""
  if which is None:
    return image
  mean, std = NORMALIZATIONS[which]
  scale = [1.0 / v for v in std]
  shift = tf.constant([-m / v for m, v in zip(mean, std)], tf.float32)
  shape = tf.shape(image)
  flat = tf.matmul(tf.reshape(image, [-1, 3]), tf.linalg.diag(tf.constant(scale, tf.float32)))
  return tf.reshape(tf.nn.bias_add(flat, shift), shape)


def _to_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] or float [0, 1] -> float32 [0, 1], 3 channels."""
  if image.dtype == tf.uint8:
    image = tf.cast(image, tf.float32) / 255.0
  else:
    image = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    image = tf.tile(image, [1, 1, 3])
  return image


def decode_crops(data: tf.Tensor, seeds, cfg: AugmentConfig) -> list[tf.Tensor]:
  """The random-resized crops of encoded image bytes, one per view seed, decoding no more of
  the image than the crops need: ``[h_i, w_i, 3] uint8`` each.

  JPEG: the size comes from the header (``tf.image.extract_jpeg_shape``), each view's box is
  sampled from it exactly as ``random_resized_crop`` samples it, and only the union of the
  boxes is decoded (``tf.image.decode_and_crop_jpeg``, as the reference TF ResNet / SimCLR
  input pipelines decode their crop). Pixels equal those of a full decode then crop, except
  on the outer ring of the decoded window of a chroma-subsampled (4:2:0, 4:2:2) JPEG, where
  libjpeg's chroma upsampling has no neighbours outside the window. Other formats (PNG, GIF,
  BMP) are decoded whole, then cropped.
  """
  is_jpeg = tf.io.is_jpeg(data)

  def whole():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.shape(image), image

  # Two small conds rather than one around everything: a cond's branches run as functions,
  # and keeping the box sampling outside them measured cheaper.
  shape, image = tf.cond(
      is_jpeg, lambda: (tf.image.extract_jpeg_shape(data), tf.zeros([0, 0, 3], tf.uint8)),
      whole)
  bs = [sample_crop_box(s, shape[0], shape[1], cfg.crop_area, cfg.crop_aspect,
                        cfg.crop_attempts) for s in seeds]
  top = tf.reduce_min(tf.stack([b[0] for b in bs]))
  left = tf.reduce_min(tf.stack([b[1] for b in bs]))
  bottom = tf.reduce_max(tf.stack([b[0] + b[2] for b in bs]))
  right = tf.reduce_max(tf.stack([b[1] + b[3] for b in bs]))
  window = tf.cond(
      is_jpeg, lambda: tf.image.decode_and_crop_jpeg(
          data, tf.stack([top, left, bottom - top, right - left]), channels=3),
      lambda: image[top:bottom, left:right])
  window.set_shape([None, None, 3])
  return [window[b[0] - top:b[0] - top + b[2], b[1] - left:b[1] - left + b[3]] for b in bs]


def _post_crop(x: tf.Tensor, seed, cfg: AugmentConfig, view: int) -> tf.Tensor:
  """Everything after the crop: flip, jitter, grayscale, blur, solarize, normalisation."""
  if view not in (1, 2):
    raise ValueError(f"view must be 1 or 2, got {view}")
  if cfg.flip_prob > 0:
    x = tf.cond(_coin(seed, _OP_FLIP, cfg.flip_prob), lambda: tf.image.flip_left_right(x),
                lambda: x)
  if cfg.jitter_prob > 0 and max(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue) > 0:
    jittered = lambda: color_jitter(x, seed, cfg.brightness, cfg.contrast, cfg.saturation,
                                    cfg.hue, cfg.jitter_random_order, cfg.brightness_mode)
    x = tf.cond(_coin(seed, _OP_JITTER, cfg.jitter_prob), jittered, lambda: x)
  if cfg.grayscale_prob > 0:
    x = tf.cond(_coin(seed, _OP_GRAY, cfg.grayscale_prob), lambda: to_grayscale(x), lambda: x)
  blur_p = cfg.blur_prob[view - 1]
  if blur_p > 0:
    sigma = _uniform(seed, _OP_BLUR + 100, (), cfg.blur_sigma[0], cfg.blur_sigma[1])
    ksize = int(cfg.image_size * cfg.blur_kernel_fraction)
    x = tf.cond(_coin(seed, _OP_BLUR, blur_p),
                lambda: tf.clip_by_value(gaussian_blur(x, sigma, ksize), 0.0, 1.0), lambda: x)
  sol_p = cfg.solarize_prob[view - 1]
  if sol_p > 0:
    x = tf.cond(_coin(seed, _OP_SOLARIZE, sol_p),
                lambda: solarize(x, cfg.solarize_threshold), lambda: x)
  x = tf.ensure_shape(x, [cfg.image_size, cfg.image_size, 3])
  return normalize(x, cfg.normalize)


def augment_view(image: tf.Tensor, seed, cfg: AugmentConfig, view: int = 1) -> tf.Tensor:
  """One training view: ``[h, w, C] uint8|float32`` -> ``[S, S, 3] float32``.

  Order: crop, flip, colour jitter, grayscale, blur, solarize, optional normalisation.
  ``seed`` is the view's seed (``view_seed``); ``view`` (1 or 2) selects the per-view
  blur/solarize probabilities.
  """
  if view not in (1, 2):
    raise ValueError(f"view must be 1 or 2, got {view}")
  x = random_resized_crop(image, seed, cfg)
  return _post_crop(x, seed, cfg, view)


def two_views(image: tf.Tensor, ex_seed, cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """The two views of an example from its ``example_seed``."""
  return (augment_view(image, view_seed(ex_seed, 1), cfg, 1),
          augment_view(image, view_seed(ex_seed, 2), cfg, 2))


def encoded_views(data: tf.Tensor, ex_seed, cfg: AugmentConfig, views=(1, 2)
                  ) -> list[tf.Tensor]:
  """``augment_view`` of encoded bytes for each of ``views``, decoding only the crops
  (``decode_crops``); same crop boxes and draws as ``augment_view`` on the decoded image."""
  seeds = [view_seed(ex_seed, v) for v in views]
  size = [cfg.image_size, cfg.image_size]
  return [_post_crop(_resize(_to_float(crop), size, cfg.resize_method), s, cfg, v)
          for crop, s, v in zip(decode_crops(data, seeds, cfg), seeds, views)]


def eval_preprocess(image: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
  """Deterministic eval view ``[S, S, 3] float32``.

  ``eval_mode="center_crop"``: resize the short side to ``S / eval_crop_fraction``
  (bicubic) and take the central ``S x S`` (0.875 for ImageNet recipes; CLIP uses 1.0, i.e.
  short side to S then centre crop). ``"resize"``: plain resize to ``S x S`` (tiny images).
  """
  x = _to_float(image)
  size = cfg.image_size
  if cfg.eval_mode == "resize":
    x = _resize(x, [size, size], cfg.resize_method)
  else:
    shape = tf.cast(tf.shape(x)[:2], tf.float32)
    target_short = math.ceil(size / cfg.eval_crop_fraction)
    scale = target_short / tf.reduce_min(shape)
    new_hw = tf.cast(tf.maximum(tf.round(shape * scale), float(size)), tf.int32)
    x = _resize(x, new_hw, cfg.resize_method)
    top = (new_hw[0] - size) // 2
    left = (new_hw[1] - size) // 2
    x = tf.image.crop_to_bounding_box(x, top, left, size, size)
  x = tf.ensure_shape(x, [size, size, 3])
  return normalize(x, cfg.normalize)
