"""Joint image/mask processing for segmentation (DeepLab's): random scale, pad, crop and flip; eval fit and pad.

Images stay in [0, 255] float32; padding is the mean pixel (127.5) for images and the ignore label for masks, so
padded pixels count in no loss or metric. Training randomness is stateless in the given seed.
"""

from __future__ import annotations

from etils import epy

from mnv2_jax.data import preprocessing, voc

with epy.lazy_imports():  # TensorFlow loads when an input pipeline first runs, not with the config
    import tensorflow as tf

MEAN_PIXEL = 127.5  # DeepLab pads images with the mean pixel value


def decode_mask(mask: tf.Tensor) -> tf.Tensor:
    """An example's `segmentation_mask` -> (height, width) class ids: PNG bytes (a VOC folder's, a TFDS `Image`)
    are decoded as VOC's masks (uint8, palette indices for palette PNGs); class-id tensors (a TFDS `Tensor`) keep
    their values (as int32 unless uint8, so that the ignore label fits whatever the stored integer type)."""
    if mask.dtype == tf.string:
        return voc.decode_mask(mask)
    return mask if mask.dtype == tf.uint8 else tf.cast(mask, tf.int32)


def decode_pair(example: dict[str, tf.Tensor], dataset: str, mask_feature: str) -> tuple[tf.Tensor, tf.Tensor]:
    """An example's photo (uint8 HWC) and mask (`decode_mask`); a mask whose height and width are not the photo's
    fails the pipeline with an error naming `dataset` and `mask_feature` (a VOC folder's are checked when opened)."""
    image = preprocessing.decode_image(example["image"])
    mask = decode_mask(example["segmentation_mask"])
    tf.debugging.assert_equal(
        tf.shape(mask),
        tf.shape(image)[:2],
        message=f"dataset {dataset}: data.mask_feature={mask_feature} holds a mask of another size than its image "
        "(x: the mask, y: the image, as height and width)",
    )
    return image, mask


def offset_labels(labels: tf.Tensor, offset: int, ignore_label: int) -> tf.Tensor:
    """`labels + offset`, except where the label is `ignore_label` (kept)."""
    if not offset:
        return labels
    return tf.where(labels == ignore_label, labels, labels + offset)


def _resize_pair(image: tf.Tensor, mask: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """Image (bilinear) and mask (nearest) of the same size (`decode_pair`) scaled together to (height, width)."""
    size = tf.stack([height, width])
    image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear")
    mask = tf.image.resize(mask[..., None], size, method="nearest")[..., 0]
    return image, mask


def _pad_pair(image: tf.Tensor, mask: tf.Tensor, height, width, ignore_label: int):
    """Pads bottom/right to at least (height, width)."""
    pad_h = tf.maximum(height - tf.shape(image)[0], 0)
    pad_w = tf.maximum(width - tf.shape(image)[1], 0)
    image = tf.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], constant_values=MEAN_PIXEL)
    mask = tf.pad(mask, [[0, pad_h], [0, pad_w]], constant_values=ignore_label)
    return image, mask


def random_scale_crop_flip(
    image: tf.Tensor,
    mask: tf.Tensor,
    seed: tf.Tensor,
    crop_size: int,
    scale_range: tuple[float, float],
    scale_step: float,
    flip: bool,
    ignore_label: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """A random rescale (`scale_range`, in steps of `scale_step`; 0: continuous), a pad to `crop_size` and a random
    `crop_size` x `crop_size` crop of image and mask together, then a random horizontal flip of both."""
    scale_seed, y_seed, x_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    low, high = scale_range
    if scale_step > 0 and high > low:
        count = round((high - low) / scale_step) + 1
        index = tf.random.stateless_uniform([], scale_seed, 0, count, dtype=tf.int32)
        scale = low + scale_step * tf.cast(index, tf.float32)
    else:
        scale = tf.random.stateless_uniform([], scale_seed, low, high)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    height, width = (tf.cast(tf.round(d * scale), tf.int32) for d in tf.unstack(shape))
    image, mask = _resize_pair(image, mask, height, width)
    image, mask = _pad_pair(image, mask, crop_size, crop_size, ignore_label)
    top = tf.random.stateless_uniform([], y_seed, 0, tf.shape(image)[0] - crop_size + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], x_seed, 0, tf.shape(image)[1] - crop_size + 1, dtype=tf.int32)
    image = image[top : top + crop_size, left : left + crop_size]
    mask = mask[top : top + crop_size, left : left + crop_size]
    if flip:
        mirrored = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(mirrored, lambda: image[:, ::-1], lambda: image)
        mask = tf.cond(mirrored, lambda: mask[:, ::-1], lambda: mask)
    image.set_shape([crop_size, crop_size, 3])
    mask.set_shape([crop_size, crop_size])
    return image, mask


def fit_and_pad(image: tf.Tensor, mask: tf.Tensor, size: int, ignore_label: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Evaluation: images larger than `size` are scaled down (mask by nearest neighbour) so that the longer side is
    `size`; then both are padded to `size` x `size`. Images that fit are evaluated at their own resolution."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(1.0, size / tf.reduce_max(shape))
    height, width = (tf.cast(tf.round(d * scale), tf.int32) for d in tf.unstack(shape))
    image, mask = _resize_pair(image, mask, height, width)
    image, mask = _pad_pair(image, mask, size, size, ignore_label)
    image.set_shape([size, size, 3])
    mask.set_shape([size, size])
    return image, mask
