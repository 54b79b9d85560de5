"""Every value derived from the config, computed in one place.

Steps per epoch, total steps, the batch-scaled learning rate, warm-up and
decay steps and per-process batch sizes follow from the final config (after
command-line overrides) and the dataset's split sizes.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from mnv2_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Plan:
    num_train_examples: int
    num_eval_examples: int
    batch_size: int  # global
    local_batch_size: int  # per process
    micro_batch_size: int  # global: each of a step's `accumulate_steps` micro-batches (batch_size without them)
    eval_batch_size: int
    local_eval_batch_size: int
    steps_per_epoch: float
    total_steps: int
    learning_rate: float  # peak, after batch scaling
    warmup_steps: int
    decay_steps: int  # steps per learning-rate decay period
    eval_every_steps: int


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    opt = config.optimizer
    ratio = config.batch_size / opt.base_batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[opt.lr_scaling]
    return opt.learning_rate * factor


def check_divisible(field: str, value: int, device_count: int, process_count: int) -> None:
    """A global batch must split evenly over devices and processes."""
    if value % device_count or value % process_count:
        raise ConfigError(
            f"{field}={value} must be divisible by the number of devices ({device_count}) "
            f"and processes ({process_count})"
        )


def check_micro_batch(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> int:
    """The micro-batch of `accumulate_steps` must split evenly over devices and processes too; returns its size."""
    k, batch, unit = config.accumulate_steps, config.batch_size, math.lcm(device_count, process_count)
    micro = batch // k
    if batch % k or micro % unit:
        allowed = [d for d in range(1, batch + 1) if batch % d == 0 and batch // d % unit == 0]
        raise ConfigError(
            f"accumulate_steps={k} makes micro-batches of batch_size // accumulate_steps = {micro} examples, which "
            f"must be divisible by the number of devices ({device_count}) and processes ({process_count}); "
            f"use accumulate_steps in {allowed}"
        )
    return micro


def make_plan(
    config: ml_collections.ConfigDict,
    num_train_examples: int,
    num_eval_examples: int,
    device_count: int,
    process_count: int,
) -> Plan:
    check_divisible("batch_size", config.batch_size, device_count, process_count)
    check_divisible("eval_batch_size", config.eval_batch_size, device_count, process_count)
    micro_batch_size = check_micro_batch(config, device_count, process_count)
    steps_per_epoch = num_train_examples / config.batch_size
    if config.num_train_steps is not None:
        total_steps = config.num_train_steps
    else:
        total_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
    opt = config.optimizer
    return Plan(
        num_train_examples=num_train_examples,
        num_eval_examples=num_eval_examples,
        batch_size=config.batch_size,
        local_batch_size=config.batch_size // process_count,
        micro_batch_size=micro_batch_size,
        eval_batch_size=config.eval_batch_size,
        local_eval_batch_size=config.eval_batch_size // process_count,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        learning_rate=scaled_learning_rate(config),
        warmup_steps=round(opt.warmup_epochs * steps_per_epoch),
        decay_steps=max(1, round(opt.decay_epochs * steps_per_epoch)),
        eval_every_steps=max(1, round(config.eval_every_epochs * steps_per_epoch)),
    )
