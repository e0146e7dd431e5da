"""The sections SFT (:class:`~jaxmm.train.sft.TrainConfig`) and GRPO
(:class:`~jaxmm.train.grpo.GRPOConfig`) share: the model to start from, the optimiser, what is
trained (``freeze``, ``lora``, ``rave``), the data, checkpointing, logging and the mesh.

Both configs derive from :class:`TrainingConfig`, so the functions that build the optimiser, the
trained state and the data (:func:`jaxmm.train.sft.optimizer`, ``initial_state``, ``dataset``, …)
take either, by type. Each field is validated from YAML (:func:`jaxmm.config.load`) and when a
config is built in Python (:class:`jaxmm.config.Validated`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Sequence

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

from jaxmm.config import Float, Fraction, Mesh, ModelRef, NonNegFloat, NonNegInt, PosFloat, PosInt, Regex, Validated, load


class LoraSpec(TypedDict, total=False):
    """``lora:`` of a training config (:class:`jaxmm.train.lora.LoraConfig`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    rank: PosInt
    alpha: Float
    targets: Regex | list[Regex]  # regexes over dotted parameter paths
    seed: NonNegInt


class RaveSpec(TypedDict, total=False):
    """``rave:`` of a training config (:func:`jaxmm.interventions.rave.init`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    layers: list[NonNegInt] | None
    heads: list[NonNegInt] | None
    rank: PosInt
    kind: Literal["bilinear", "mlp"]
    seed: NonNegInt
    scale: PosFloat


class AgtoSpec(TypedDict, total=False):
    """``agto:`` AVAR's AGTO losses (:func:`jaxmm.objectives.avar.agto_extra_loss`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    alpha: NonNegFloat
    beta: NonNegFloat
    eps: PosFloat
    layers: list[NonNegInt] | None


class DataSpec(TypedDict, total=False):
    """``data:`` the grounded VQA generator (:func:`jaxmm.train.sft.dataset`)."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Literal["grounded"]
    size: PosInt
    seed: NonNegInt
    image_size: PosInt
    tasks: Annotated[list[Literal["recognition", "counting", "grounding", "ocr", "spatial"]], Field(min_length=1)]
    shape_scale: PosFloat
    contrast: Fraction


@dataclasses.dataclass
class TrainingConfig(Validated):
    """The fields SFT and GRPO share (each config sets its own defaults).

    ``model``: ``None`` (or ``"organism"``) = the shipped trained organism, ``"organism-random"`` =
    the seeded random-weight organism (training from scratch), else an HF checkpoint directory
    (:data:`jaxmm.config.ModelRef`). Optimiser: AdamW with ``lr`` (peak), a linear warm-up over
    ``warmup`` × ``steps`` steps then cosine decay, ``weight_decay``, global-norm clipping at
    ``clip_norm``, ``grad_accum`` micro-batches per update. Trained: the backbone minus ``freeze``
    (regexes over dotted parameter paths), or LoRA adapters (``lora``), and/or a RAVE module
    (``rave``). Checkpoints every ``save_every`` steps, the last ``keep`` kept; metrics every
    ``log_every`` steps (``tensorboard``: also TensorBoard events). ``mesh``: ``{data, fsdp, tensor}``
    over every device of every process (multi-host: call ``jax.distributed.initialize()`` first;
    process 0 writes the logs).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    model: ModelRef = None
    out: str = "runs/train"
    steps: PosInt = 100
    lr: PosFloat = 1e-3
    warmup: Fraction = 0.1
    weight_decay: NonNegFloat = 0.0
    clip_norm: PosFloat = 1.0
    grad_accum: PosInt = 1
    freeze: list[Regex] = dataclasses.field(default_factory=list)
    lora: LoraSpec | None = None
    rave: RaveSpec | None = None
    data: DataSpec = dataclasses.field(default_factory=lambda: {"name": "grounded", "size": 4096, "seed": 0, "image_size": 112})
    save_every: PosInt = 50
    keep: PosInt = 2
    log_every: PosInt = 10
    tensorboard: bool = True
    seed: NonNegInt = 0
    mesh: Mesh | None = None

    @classmethod
    def from_yaml(cls, path, overrides: Sequence[str] = ()):
        """The config in YAML file ``path`` (``None``: the defaults) plus ``key=value`` overrides
        (dotted keys, YAML values), validated against the annotations (:func:`jaxmm.config.load`).

        Raises:
            jaxmm.config.ConfigError (a ValueError): bad YAML, a malformed override, an unknown
                field or a bad value, naming the file and line or the override, the field and the value.
            OSError: the file cannot be read.
        """
        return load(cls, path, overrides)
