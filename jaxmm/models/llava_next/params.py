"""Hugging Face checkpoint keys -> jaxmm parameter paths for LLaVA-NeXT (a declarative table).

Every key layout is read: transformers 5 (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.image_newline``, ``model.language_model.*``, ``lm_head.*``), what its ``save_pretrained``
writes and the published llava-hf checkpoints hold (``vision_tower.vision_model.*``,
``multi_modal_projector.*``, ``image_newline``, ``language_model.model.*``,
``language_model.lm_head.*``: the renaming of transformers' ``conversion_mapping.py``, "llava",
reversed), with or without the ``vision_model.`` level.
"""

from __future__ import annotations

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core import params as core
from jaxmm.models.core.clip import clip_key_rules

_V = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
_P = r"(?:model\.)?multi_modal_projector\."
_T = r"(?:model\.language_model\.|language_model\.model\.)"

KEY_RULES: tuple[Rule, ...] = clip_key_rules(_V, _P, _T) + (Rule(r"(?:model\.)?image_newline", "visual.image_newline"),)
IGNORE = core.IGNORE + (r"(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids",)
IGNORE_TIED = IGNORE + (r"(?:language_model\.)?lm_head\.weight",)
