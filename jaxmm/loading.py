"""``jaxmm.load``: a Hugging Face checkpoint directory -> :class:`Model` (config + params pytree).

The :class:`Model` is a thin, stateless-in-spirit wrapper: it holds ``config`` and ``params`` and
forwards to the family's pure, jitted ``forward``. Research code that wants the pure function uses
``jaxmm.models.qwen2_5_vl.forward(model.params, model.config, batch, ...)`` directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.checkpoint.hf import CheckpointError, convert, open_checkpoint
from jaxmm.models import qwen2_5_vl

_FAMILIES = {"qwen2_5_vl": qwen2_5_vl}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Model:
    """A loaded model: ``config``, ``params`` (an ``nnx.State`` pytree) and the family module.

    ``forward`` takes the HF processor's outputs directly (numpy or torch tensors) and returns the
    family's ``ModelOutput`` (``.logits`` [B,S,V], ``.hidden_states``, ``.probes``).
    """

    def __init__(self, family, config, params: nnx.State, path: Path | None = None):
        self.family, self.config, self.params, self.path = family, config, params, path

    @property
    def dtype(self):
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, **layout_spans):
        """Host-side checks and index computation; returns the family's ``Batch``."""
        return self.family.prepare_batch(self.config, input_ids, attention_mask, pixel_values,
                                         image_grid_thw, position_ids, **layout_spans)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                position_ids=None, interventions: Sequence = (), probes: Sequence = (),
                output_hidden_states: bool = False, batch=None, mm_token_type_ids=None, **unused):
        """One jitted forward pass.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids: as the HF processor
                and ``Qwen2_5_VLForConditionalGeneration.forward`` name them (numpy or torch).
                ``mm_token_type_ids`` is accepted and ignored (jaxmm derives it from ``input_ids``).
            interventions, probes: see :mod:`jaxmm.attention`.
            output_hidden_states: also return per-layer hidden states.
            batch: a prepared ``Batch`` instead of the arrays above.

        Raises:
            TypeError: on an argument the model does not know (HF processors add none we refuse
                silently except ``mm_token_type_ids``).
        """
        if unused:
            raise TypeError(f"forward() got unexpected arguments: {sorted(unused)}")
        if batch is None:
            if input_ids is None:
                raise ValueError("forward() needs input_ids (or a prepared batch=)")
            batch = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids)
        return self.family.forward_jit(self.params, self.config, batch, tuple(interventions), tuple(probes),
                                       output_hidden_states)

    __call__ = forward


def load(path: str | Path, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None) -> Model:
    """Restores a Hugging Face checkpoint directory (``config.json`` + safetensors).

    Args:
        path: directory holding ``config.json`` and ``model.safetensors`` or a sharded index.
        dtype: parameter and compute dtype: "float32", "bfloat16" or "float16". Checkpoint tensors
            of any of these dtypes are cast to it.
        mesh: optional ``jax.sharding.Mesh``; parameters are placed by their logical axis names
            (:mod:`jaxmm.sharding`).

    Raises:
        FileNotFoundError: no config.json / no weights.
        ConfigError: a config.json field is missing or inconsistent.
        CheckpointError: a missing, unexpected or mis-shaped tensor, a truncated file, a pickle file.
    """
    path = Path(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{cfg_file}: model_type={model_type!r} is not supported "
                         f"(supported: {sorted(_FAMILIES)})")
    config = family.Config.from_pretrained(path)
    abstract = family.abstract_params(config, dtype)
    expected = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
    ckpt = open_checkpoint(path)
    ignore = family.IGNORE_TIED if config.tie_word_embeddings else family.IGNORE
    try:
        arrays = convert(ckpt, family.KEY_RULES, expected, dtype=np.dtype(_DTYPES[dtype]), ignore=ignore)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(if shapes differ everywhere, does {cfg_file} describe these "
                              f"weights?)") from None
    shardings = None
    if mesh is not None:
        from jaxmm.sharding import param_shardings
        shardings = param_shardings(abstract, mesh)
    flat = []
    for p, v in nnx.to_flat_state(abstract):
        a = arrays[p]
        a = jax.device_put(a, None if shardings is None else shardings[p])
        flat.append((p, v.replace(a)))
    params = nnx.from_flat_state(flat)
    return Model(family, config, params, path)
