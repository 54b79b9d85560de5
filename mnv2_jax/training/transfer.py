"""`config.init_from`: start a run from another workdir's weights (a classification run, any `mnv2 import`) or
from published weights by name (`mnv2 import --list`, `hf-hub:<repo>`).

Every tensor of this run's model whose name and shape match one of the source's is loaded (e.g. the whole
backbone into a segmenter); the others keep their initialisation, and the source's tensors this model does not have
are left out. A tensor present in both with different shapes is an error that names it, except the classifier's
`Logits` of another class count, which start from their initialisation (fine-tuning to new classes).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any

import jax
from absl import logging

from mnv2_jax.errors import UserError
from mnv2_jax.training import checkpoint

COLLECTIONS = ("params", "batch_stats")
CLASSIFIER_SCOPE = "Logits/"  # the classifier's layer, whose shape follows the class count


class TransferError(UserError):
    """The source's tensors do not fit this run's model."""


@dataclasses.dataclass(frozen=True)
class Transfer:
    loaded: tuple[str, ...]  # `collection/scope/.../leaf` names
    new: tuple[str, ...]  # this model's, not in the source: initialised
    left_out: tuple[str, ...]  # the source's, not in this model

    def describe(self) -> str:
        """One line per group, counted by top-level scope."""

        def by_scope(names):
            counts = collections.Counter(name.split("/")[1] for name in names)
            return ", ".join(f"{scope} ({n})" for scope, n in counts.items()) or "none"

        return (
            f"loaded {len(self.loaded)} tensors: {by_scope(self.loaded)}; "
            f"initialised {len(self.new)}: {by_scope(self.new)}; "
            f"left out {len(self.left_out)} of the source's: {by_scope(self.left_out)}"
        )


def match(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[dict[str, Any], Transfer]:
    """`ours` (`{'params', 'batch_stats'}` trees) with every tensor of `theirs` of the same name and shape. The
    classifier's `Logits` of another class count are left initialised (as timm does for a new `num_classes`); any
    other tensor of both with different shapes is an error."""
    our_leaves = {c: checkpoint.leaves_by_name(ours[c]) for c in COLLECTIONS}
    their_leaves = {c: checkpoint.leaves_by_name(theirs[c]) for c in COLLECTIONS}
    differ = lambda c, name, leaf: name in their_leaves[c] and tuple(their_leaves[c][name].shape) != tuple(leaf.shape)
    mismatched = [
        f"{c}/{name}: source {tuple(their_leaves[c][name].shape)} vs model {tuple(leaf.shape)}"
        for c in COLLECTIONS
        for name, leaf in our_leaves[c].items()
        if differ(c, name, leaf) and not name.startswith(CLASSIFIER_SCOPE)
    ]
    if mismatched:
        more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
        raise TransferError(f"init_from: tensors of different shapes: {'; '.join(mismatched[:3])}{more}")
    for c in COLLECTIONS:  # a head of another class count: initialised, the source's left out
        their_leaves[c] = {n: v for n, v in their_leaves[c].items() if not differ(c, n, our_leaves[c].get(n, v))}
    names = lambda leaves: {f"{c}/{name}" for c in COLLECTIONS for name in leaves[c]}
    ours_named, theirs_named = names(our_leaves), names(their_leaves)
    transfer = Transfer(
        loaded=tuple(sorted(ours_named & theirs_named)),
        new=tuple(sorted(ours_named - theirs_named)),
        left_out=tuple(sorted(theirs_named - ours_named)),
    )
    if not transfer.loaded:
        raise TransferError("init_from: no tensor of the source has a name of this model's (another architecture?)")

    def take(collection):
        source = their_leaves[collection]
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: source.get(checkpoint.path_name(path), leaf), ours[collection]
        )

    return {c: take(c) for c in COLLECTIONS}, transfer


def is_weights_name(init_from: str) -> bool:
    """`init_from` names published weights (`mnv2 import --list`, `hf-hub:...`) rather than a workdir."""
    from mnv2_jax.weights import registry

    return registry.is_name(init_from) and not os.path.exists(init_from)


def check_source(init_from: str) -> None:
    """`init_from` is a workdir holding a checkpoint, or weights by name, downloaded and converted here (before the
    dataset is prepared and anything compiles)."""
    if is_weights_name(init_from):
        from mnv2_jax.weights import pretrained

        pretrained.load(init_from)
        return
    if checkpoint.latest_step(init_from) is None:
        where = checkpoint.checkpoint_dir(init_from)
        raise TransferError(
            f"init_from={init_from!r} holds no checkpoint (no step in {where}); it must be the workdir of a "
            "training run or of `mnv2 import`, or a weights name (`mnv2 import --list`, `hf-hub:<repo>`)"
        )


def source_variables(init_from: str, sharding: jax.sharding.Sharding) -> tuple[str, dict[str, Any]]:
    """`init_from`'s params and batch statistics placed with `sharding`, and a description of where they are from."""
    if is_weights_name(init_from):
        from mnv2_jax.weights import pretrained

        variables, _ = pretrained.load(init_from)
        return init_from, jax.device_put({c: variables[c] for c in COLLECTIONS}, sharding)
    step, saved = checkpoint.restore_as_saved(init_from, COLLECTIONS, sharding)
    return f"{init_from} (step {step})", saved


def initialise_from(state, init_from: str, sharding: jax.sharding.Sharding):
    """`state` with the params and batch statistics of `init_from` (a workdir's latest checkpoint, or weights by
    name) where they match."""
    source, saved = source_variables(init_from, sharding)
    variables, transfer = match({"params": state.params, "batch_stats": state.batch_stats}, saved)
    logging.info("initialised params and batch statistics from %s: %s", source, transfer.describe())
    # The EMA starts at the loaded weights, in its own buffers: the train step donates both.
    ema = None if state.ema_params is None else jax.tree.map(lambda a: a.copy(), variables["params"])
    return state.replace(params=variables["params"], batch_stats=variables["batch_stats"], ema_params=ema), transfer
