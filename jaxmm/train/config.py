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

from pydantic import ConfigDict, Discriminator, Tag
from typing_extensions import Required, TypedDict

from jaxmm.config import (
    Float,
    Fraction,
    GroundedTasks,
    Mesh,
    ModelRef,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Regex,
    Validated,
    load,
)
from jaxmm.eval.benchmarks import READERS


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


class GroundedData(TypedDict, total=False):
    """``data:`` jaxmm's grounded VQA generator (:func:`jaxmm.data.grounded.make_sample`): ``size``
    distinct samples of ``seed``, square images of ``image_size`` pixels, cycling ``tasks``."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Literal["grounded"]
    size: PosInt
    seed: NonNegInt
    image_size: PosInt
    tasks: GroundedTasks
    shape_scale: PosFloat
    contrast: Fraction


#: the file schemas a training set may be read in: :data:`jaxmm.eval.benchmarks.READERS` but the
#: generator and CHAIR's captioning rows, the generic ``vqa`` first
FILE_SCHEMAS = ("vqa",) + tuple(n for n in READERS if n not in ("vqa", "grounded", "chair"))


class FileData(TypedDict, total=False):
    """``data:`` samples read from files (:func:`jaxmm.eval.benchmarks.load`): ``name`` the schema
    (``vqa``: question/answer or a LLaVA/ShareGPT chat, one image, optional ``box``), ``path`` a
    ``.jsonl``/``.json``/``.parquet`` file, a directory or a glob (docs/training.md), ``fields`` the file's own column names
    (``{question: problem, image: images}``), ``limit`` the first rows only, ``seed`` of the shuffle."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Required[Literal[FILE_SCHEMAS]]
    path: Required[str]
    fields: dict[str, str]
    limit: PosInt
    seed: NonNegInt


def _data_kind(v) -> str:
    return "grounded" if not isinstance(v, dict) or v.get("name", "grounded") == "grounded" else "file"


#: ``data:`` of a training config: the generator, or files
DataSpec = Annotated[Annotated[GroundedData, Tag("grounded")] | Annotated[FileData, Tag("file")], Discriminator(_data_kind)]


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
    process 0 writes the logs). ``min_pixels`` / ``max_pixels``: the image processor's resize bounds
    (:meth:`jaxmm.loading.Model.set_pixels`; LLaMA-Factory's ``image_max_pixels``). ``remat``: each
    decoder layer rematerialised in the backward pass (``jax.checkpoint``: the same gradients, only
    the layers' inputs kept; HF's ``gradient_checkpointing``).
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
    remat: bool = False  # recompute each decoder layer in the backward pass (jax.checkpoint): long sequences
    min_pixels: PosInt | None = None  # image resize bounds (Qwen-VL; None: the checkpoint's): Model.set_pixels
    max_pixels: PosInt | None = None

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
