"""Fine-tuning controls (`config.fine_tune`), applied to the optimizer through optax.

Parameters are chosen by regular expressions searched in their names (`expanded_conv_3/depthwise/kernel`,
`Logits/bias`, `aspp0/BatchNorm/scale`; `mnv2 summary --per_layer` lists the layers); the pattern `backbone` stands
for the MobileNetV2 backbone's layers (`Conv`, `expanded_conv*`, `Conv_1`), whatever the task.

- `freeze`: those parameters get no update and keep no optimizer state (`optax.multi_transform` with
  `optax.set_to_zero`); their batch norms also run on their stored statistics and keep them (Keras's rule for a
  frozen BatchNormalization), so a frozen layer is bitwise unchanged by training.
- `linear_probe`: `freeze=("backbone",)`: only the task's head trains.
- `lr_multipliers`: `((pattern, multiplier), ...)`; the first matching pattern scales that parameter's update
  (`optax.scale` in a `multi_transform`), i.e. its learning rate, weight decay included.
- `no_weight_decay`: parameters left out of weight decay, besides the optimizer's own rule (`optim.py`).
- `frozen_batch_norm`: layers whose batch norms run on their stored statistics and keep them while their weights
  (scales and offsets included) train: DeepLab's `fine_tune_batch_norm=False` is `("backbone",)`. One rule for
  every task.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from mnv2_jax.config_checks import ConfigError

BACKBONE = "backbone"
BACKBONE_PATTERN = r"^(Conv|Conv_1|expanded_conv(_\d+)?)/"
FROZEN, TRAINED = "frozen", "trained"


def add_config(config: ml_collections.ConfigDict) -> None:
    """`config.fine_tune` with nothing frozen, every multiplier 1 and the optimizer's own weight decay rule."""
    ft = config.fine_tune = ml_collections.ConfigDict()
    ft.freeze = ()  # patterns of parameters to keep fixed ("backbone": the backbone's layers)
    ft.linear_probe = False  # freeze the backbone: only the task's head trains
    ft.lr_multipliers = ()  # ((pattern, multiplier), ...): the first match scales that parameter's learning rate
    ft.no_weight_decay = ()  # patterns of parameters excluded from weight decay
    # patterns of layers whose batch norms run on, and keep, their stored statistics while their weights train
    # (DeepLab's fine_tune_batch_norm=False is ("backbone",): batches below 12, imported folded statistics)
    ft.frozen_batch_norm = ()


def _regex(field: str, pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ConfigError(f"{field}: patterns are strings (regular expressions or 'backbone'), got {pattern!r}")
    try:
        return re.compile(BACKBONE_PATTERN if pattern == BACKBONE else pattern)
    except re.error as e:
        raise ConfigError(f"{field}: {pattern!r} is not a regular expression ({e})") from None


def validate(ft: ml_collections.ConfigDict) -> None:
    """Checks `config.fine_tune`'s fields (one-line errors naming the field)."""
    for field in ("freeze", "no_weight_decay", "frozen_batch_norm"):
        for pattern in ft[field]:
            _regex(f"fine_tune.{field}", pattern)
    if ft.linear_probe not in (False, True):
        raise ConfigError(f"fine_tune.linear_probe must be True or False, got {ft.linear_probe!r}")
    for pair in ft.lr_multipliers:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or isinstance(pair[1], bool)
            or not isinstance(pair[1], (int, float))
            or pair[1] < 0
        ):
            raise ConfigError(f"fine_tune.lr_multipliers: expected (pattern, multiplier >= 0) pairs, got {pair!r}")
        _regex("fine_tune.lr_multipliers", pair[0])


def frozen_patterns(ft: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The `freeze` patterns, with the backbone's when `linear_probe` is set."""
    return (*ft.freeze, BACKBONE) if ft.linear_probe else tuple(ft.freeze)


def matcher(field: str, patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a parameter name matches one of `patterns`."""
    compiled = [_regex(field, p) for p in patterns]
    return lambda name: any(p.search(name) for p in compiled)


def _labels(params: Any, label_of: Callable[[str], str], field: str, patterns: tuple[str, ...]) -> Any:
    from mnv2_jax.training.checkpoint import path_name  # orbax: not imported with the config

    labels = jax.tree_util.tree_map_with_path(lambda path, _: label_of(path_name(path)), params)
    names = [path_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern in patterns:
        if not any(_regex(field, pattern).search(name) for name in names):
            raise ConfigError(f"{field}: {pattern!r} matches no parameter of this model (e.g. {names[0]!r})")
    return labels


def _freezing(tx: optax.GradientTransformation, patterns: tuple[str, ...]) -> optax.GradientTransformation:
    frozen = matcher("fine_tune.freeze", patterns)
    labels = lambda params: _labels(
        params, lambda name: FROZEN if frozen(name) else TRAINED, "fine_tune.freeze", patterns
    )
    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def _multipliers(pairs: tuple[tuple[str, float], ...]) -> optax.GradientTransformation:
    compiled = [(_regex("fine_tune.lr_multipliers", p), float(m)) for p, m in pairs]

    def label_of(name: str) -> str:
        return str(next((m for p, m in compiled if p.search(name)), 1.0))

    patterns = tuple(p for p, _ in pairs)
    labels = lambda params: _labels(params, label_of, "fine_tune.lr_multipliers", patterns)
    scales = {str(m): optax.scale(m) for m in {1.0, *(m for _, m in compiled)}}
    return optax.multi_transform(scales, labels)


def apply(tx: optax.GradientTransformation, ft: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`tx` with `ft`'s frozen parameters and learning-rate multipliers; `tx` itself when neither is set (the same
    optimizer state as without fine-tuning controls)."""
    if ft.lr_multipliers:
        tx = optax.chain(tx, _multipliers(tuple(tuple(pair) for pair in ft.lr_multipliers)))
    patterns = frozen_patterns(ft)
    return _freezing(tx, patterns) if patterns else tx


def frozen_batch_norm(ft: ml_collections.ConfigDict) -> contextlib.AbstractContextManager:
    """A context for the training forward pass: the batch norms of frozen layers and of `frozen_batch_norm`'s run on
    their stored statistics and keep them (Flax's `intercept_methods` passes `train=False` to those `BatchNorm`
    calls)."""
    from mnv2_jax.models.batch_norm import BatchNorm

    patterns = (*frozen_patterns(ft), *ft.frozen_batch_norm)
    if not patterns:
        return contextlib.nullcontext()
    frozen = matcher("fine_tune.freeze", patterns)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        is_batch_norm = isinstance(module, BatchNorm) and context.method_name == "__call__"
        if is_batch_norm and frozen("/".join((*module.path, "scale"))):
            return next_fun(args[0] if args else kwargs["x"], False)
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)
