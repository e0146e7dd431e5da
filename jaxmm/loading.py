"""``jaxmm.load``: a Hugging Face checkpoint directory -> :class:`Model` (config + params pytree).

The :class:`Model` is a thin, stateless-in-spirit wrapper: it holds ``config`` and ``params`` and
forwards to the family's pure, jitted ``forward``. Research code that wants the pure function uses
``jaxmm.models.core.forward(model.params, model.config, batch, ...)`` directly.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.checkpoint.hf import CheckpointError, iter_converted, open_checkpoint
from jaxmm.config import ConfigError
from jaxmm.models.registry import FAMILIES, family_of  # noqa: F401  (re-exported: jaxmm.loading.family_of)

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
        """The parameters' dtype (that of the first leaf: ``jaxmm.load`` casts all of them alike)."""
        return jax.tree_util.tree_leaves(self.params)[0].dtype

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None, **layout_spans):
        """Host-side checks and index computation; returns the family's ``Batch``
        (:func:`jaxmm.processing.batch.tensor_batch`)."""
        from jaxmm.processing.batch import tensor_batch

        return tensor_batch(self, input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, **layout_spans)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        *,
        position_ids=None,
        interventions: Sequence = (),
        probes: Sequence = (),
        output_hidden_states: bool = False,
        batch=None,
        mm_token_type_ids=None,
        image_sizes=None,
        **unused,
    ):
        """One jitted forward pass.

        Args:
            input_ids, attention_mask, pixel_values, image_grid_thw, position_ids: as the HF processor
                and ``Qwen2_5_VLForConditionalGeneration.forward`` name them (numpy or torch).
                ``mm_token_type_ids`` is accepted and ignored (jaxmm derives it from ``input_ids``).
                ``image_sizes`` [n_images, 2] (HF LLaVA-NeXT's original image sizes) goes to the
                families that read it (``llava_next``).
                ``position_ids``: [3,B,S], HF's [4,B,S] ([text; t; h; w]: rows 1..3 are used) or
                [B,S]; default computed as HF's ``get_rope_index``.
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
            extra = {} if image_sizes is None else {"image_sizes": image_sizes}
            batch = self.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, **extra)
        ivs = self.interventions(interventions)
        if any(iv.prefill_probes() for iv in ivs):  # two-phase methods: plan from a first pass
            from jaxmm.attention import plan

            ivs = plan(self.params, self.config, batch, ivs, self.family.forward_jit)
        return self.family.forward_jit(self.params, self.config, batch, ivs, tuple(probes), output_hidden_states)

    def interventions(self, specs) -> tuple:
        """Names / dicts / YAML paths / objects -> intervention objects for this model's config."""
        from jaxmm.interventions import build

        return build(specs, self.config) if specs else ()

    __call__ = forward

    # ------------------------------------------------------------------ chat and generation
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (``tokenizer.json`` beside the weights)."""
        if getattr(self, "_tokenizer", None) is None:
            from jaxmm.processing.chat import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @property
    def image_processor(self):
        """The checkpoint's image processor (``preprocessor_config.json``)."""
        if getattr(self, "_image_processor", None) is None:
            self._image_processor = self.family.image_processor(self.path, self.config)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, processor):
        """Replaces the image processor, e.g. with other pixel bounds:
        ``model.image_processor = dataclasses.replace(model.image_processor, max_pixels=1280 * 28 * 28)``."""
        self._image_processor = processor

    def set_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """Bounds the image processor's resize to ``min_pixels`` … ``max_pixels`` pixels per image
        (Qwen-VL families; ``None`` keeps the checkpoint's bound), as HF's processor kwargs and
        LLaMA-Factory's ``image_max_pixels`` do.

        Raises:
            ValueError: a bound given for a processor that resizes to a fixed size (LLaVA), or
                ``min_pixels`` > ``max_pixels``.
        """
        if min_pixels is None and max_pixels is None:
            return
        proc = self.image_processor
        if not hasattr(proc, "min_pixels"):
            raise ValueError(
                f"min_pixels / max_pixels set, but {type(proc).__name__} (model_type="
                f"{self.config.model_type!r}) resizes to a fixed size; leave them unset"
            )
        lo = proc.min_pixels if min_pixels is None else min_pixels
        hi = proc.max_pixels if max_pixels is None else max_pixels
        if lo > hi:
            raise ValueError(f"min_pixels={lo} > max_pixels={hi}")
        self._image_processor = dataclasses.replace(proc, min_pixels=lo, max_pixels=hi)

    def prepare_chat(self, conversations, add_generation_prompt: bool = True, pad_to_multiple_of: int | None = None):
        """One conversation (a list of messages) or several -> (left-padded ``Batch``, info) with
        ``info = {"texts": prompt texts, "image_grid_thw": [n_images, 3] or None}``
        (:func:`jaxmm.processing.batch.chat_batch`).

        ``pad_to_multiple_of``: left-pad the batch to a multiple of this many tokens, so that loops
        over batches of varying prompts (training) reuse compiled shapes.

        Image parts carry the image itself: ``{"type": "image", "image": PIL image | array | path}``.

        Raises:
            TypeError: ``conversations`` is a bare string (or not a list) instead of chat messages.
            ValueError: malformed messages (naming the conversation and message), an image part
                without an image, an image that cannot be read or processed; image errors name the
                image's index in the prompt (and ``conversation i`` when there are several) and its
                file path.
            FileNotFoundError: an image path that does not exist.
        """
        from jaxmm.processing.batch import chat_batch

        return chat_batch(self, conversations, add_generation_prompt, pad_to_multiple_of)

    def generate(
        self,
        messages_or_batch,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        key=None,
        stop_tokens=None,
        interventions: Sequence = (),
        probes: Sequence = (),
        output_logits: bool = False,
        reprefill: bool | None = None,
        pai_contrast: float | None = None,
    ):
        """Generates from chat messages (one conversation or a list) or from a prepared ``Batch``.

        ``interventions`` may be names, dicts or YAML paths (:func:`jaxmm.interventions.build`).
        ``pai_contrast=γ`` adds PAI's contrast against the same prompts without images (γ = 1.1 in
        the paper); a PAI intervention with ``gamma`` set asks for it too (:func:`jaxmm.generate.pai_contrast_for`).

        Returns the :class:`~jaxmm.generate.GenerateOutput`; from messages it also carries ``text``
        (list of decoded completions, special tokens removed).

        Raises:
            ValueError: ``max_new_tokens`` not a positive integer (checked before any work), and
                :meth:`prepare_chat`'s and :func:`jaxmm.generate.generate`'s errors.
            TypeError: a bare string instead of chat messages.
        """
        from jaxmm.generate import Sampling, check_max_new_tokens, generate, pai_contrast_for
        from jaxmm.processing import batch as host

        max_new_tokens = check_max_new_tokens(max_new_tokens)
        chat = not hasattr(messages_or_batch, "input_ids")
        batch = self.prepare_chat(messages_or_batch)[0] if chat else messages_or_batch
        if stop_tokens is None:
            stop_tokens = host.stop_tokens(self, chat)
        pad = host.pad_token_id(self) if chat else 0
        ivs = self.interventions(interventions)
        out = generate(
            self.params,
            self.config,
            batch,
            max_new_tokens=max_new_tokens,
            sampling=Sampling(temperature, top_k, top_p),
            key=key,
            stop_tokens=stop_tokens,
            pad_token_id=pad,
            interventions=ivs,
            probes=probes,
            output_logits=output_logits,
            reprefill=reprefill,
            contrast=pai_contrast_for(batch, self.config, ivs, pai_contrast),
        )
        if chat:
            from jaxmm.processing.chat import decode

            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            out = dataclasses.replace(out, text=tuple(decode(self.tokenizer, t[:n]) for t, n in zip(tokens, lengths)))
        return out


#: Tensors only one family has (its vision MLP's names), to tell a config.json's model_type from
#: the family the weights were saved by.
_FINGERPRINTS = {
    "qwen2_5_vl": re.compile(r"(.*\.)?visual\.blocks\.\d+\.mlp\.gate_proj\.weight"),
    "qwen2_vl": re.compile(r"(.*\.)?visual\.blocks\.\d+\.mlp\.fc1\.weight"),
    "qwen3_vl": re.compile(r"(.*\.)?visual\.blocks\.\d+\.mlp\.linear_fc1\.weight"),
}


def _check_family(ckpt, config_file: Path, model_type: str) -> None:
    """Raises CheckpointError when the weights carry another family's tensors and none of ``model_type``'s."""
    found = {}
    for key in ckpt.keys():
        for fam, pat in _FINGERPRINTS.items():
            if fam not in found and pat.fullmatch(key):
                found[fam] = key
    others = [f for f in found if f != model_type]
    if others and model_type not in found:
        key = found[others[0]]
        raise CheckpointError(
            f"{config_file} says model_type={model_type!r}, but the weights are a "
            f"{others[0]!r} checkpoint (tensor {key!r} in {ckpt.file(key).name} is a "
            f"{others[0]} vision-MLP tensor); use the config.json saved with these weights"
        )


def load(path: str | Path, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None) -> Model:
    """Restores a Hugging Face checkpoint directory (``config.json`` + safetensors), or a directory
    written by ``jaxmm convert`` (tensorstore arrays, read slice by slice onto the mesh).

    Args:
        path: directory holding ``config.json`` and ``model.safetensors`` or a sharded index, or a
            converted checkpoint.
        dtype: parameter and compute dtype: "float32", "bfloat16" or "float16". Checkpoint tensors
            of any of these dtypes are cast to it.
        mesh: optional ``jax.sharding.Mesh``; parameters are placed by their logical axis names
            (:mod:`jaxmm.sharding`).

    Raises:
        FileNotFoundError: no config.json / no weights.
        ConfigError: config.json is not valid JSON, or a field is missing, of the wrong type or
            inconsistent (names the file and the field).
        CheckpointError: a missing, unexpected or mis-shaped tensor, a truncated file, a pickle file,
            a non-float tensor for a float parameter, weights of another family than config.json's
            ``model_type``.
    """
    from jaxmm.checkpoint import store

    path = Path(path)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}")
    family = family_of(path)
    try:
        config = family.Config.from_pretrained(path)
    except ConfigError:
        # weights of another family under this model_type fail config checks of the wrong family
        # (its activations, its fields): say what is wrong, when the weights show it
        if not store.is_converted(path):
            try:
                ckpt = open_checkpoint(path)
            except (CheckpointError, FileNotFoundError):
                ckpt = None
            if ckpt is not None:
                _check_family(ckpt, path / "config.json", family.name)
        raise
    abstract = family.abstract_params(config, dtype)
    expected = {p: v.get_value() for p, v in nnx.to_flat_state(abstract)}
    shardings = None
    if mesh is not None:
        from jaxmm.sharding import param_shardings

        shardings = param_shardings(abstract, mesh)
    if store.is_converted(path):  # jaxmm convert output: each device reads its own slice
        arrays = store.restore(path, expected, np.dtype(_DTYPES[dtype]), shardings)
    else:
        ckpt = open_checkpoint(path)
        _check_family(ckpt, path / "config.json", config.MODEL_TYPE)
        ignore = family.IGNORE_TIED if config.tie_word_embeddings else family.IGNORE
        try:
            # on a mesh, tensors stay unread (LazyTensor) until each device reads its own slice
            tensors = dict(
                iter_converted(
                    ckpt, family.KEY_RULES, expected, dtype=np.dtype(_DTYPES[dtype]), ignore=ignore, lazy=shardings is not None
                )
            )
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\n(if shapes differ everywhere, does {path / 'config.json'} describe these weights?)"
            ) from None
        # make_array_from_callback: each device takes its own slice, also across hosts
        arrays = {
            p: jax.device_put(a)
            if shardings is None
            else jax.make_array_from_callback(a.shape, shardings[p], lambda idx, a=a: a[idx])
            for p, a in tensors.items()
        }
    flat = [(p, v.replace(arrays[p])) for p, v in nnx.to_flat_state(abstract)]
    params = nnx.from_flat_state(flat)
    return Model(family, config, params, path)
