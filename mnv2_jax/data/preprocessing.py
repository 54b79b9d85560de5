"""The model's input preprocessing, shared by training, evaluation, prediction and export.

Images enter as RGB pixel values in [0, 255]; `normalize` maps them to what the
model expects: `inception` ([-1, 1], the authors' and Keras's) or `imagenet`
(ImageNet mean/std, torchvision's).
"""

from __future__ import annotations

import numpy as np
from etils import epy

from mnv2_jax.errors import UserError

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, mode: str):
    """Pixel values in [0, 255] -> model input. Works on numpy, jax and tf tensors of float dtype."""
    if mode == "inception":
        return images / 127.5 - 1.0
    if mode == "imagenet":
        return (images / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    raise ValueError(f"model.preprocessing must be one of ('inception', 'imagenet'), got {mode!r}")


def decode_image(data: tf.Tensor, channels: int = 3) -> tf.Tensor:
    """Decodes JPEG/PNG/BMP/GIF bytes to uint8 HWC with `channels` channels (grey is replicated)."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def resize(image: tf.Tensor, resolution: int) -> tf.Tensor:
    """Bilinear resize of the whole image to `resolution` x `resolution` (float32, still in [0, 255])."""
    return tf.image.resize(tf.cast(image, tf.float32), (resolution, resolution), method="bilinear")


def load_image_as_is(path: str, channels: int = 3) -> np.ndarray:
    """Reads and decodes an image file at its own size; returns float32 HWC pixels in [0, 255]."""
    try:
        image = decode_image(tf.io.read_file(path), channels)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise UserError(f"cannot read image {path}: {e.message.splitlines()[0]}") from None
    return image.numpy().astype(np.float32)


def load_image(path: str, resolution: int, channels: int = 3) -> np.ndarray:
    """Reads an image file, decodes it and resizes it; returns float32 HWC pixels in [0, 255]."""
    return resize(load_image_as_is(path, channels), resolution).numpy()
