"""Hugging Face checkpoint keys -> jaxmm parameter paths for LLaVA (a declarative table).

Every key layout is read: transformers 5 (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, ``lm_head.*``), what its ``save_pretrained`` writes
(``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
``language_model.lm_head.*``: the renaming of transformers' ``conversion_mapping.py``, "llava",
reversed) and the published llava-hf checkpoints (the same with ``vision_tower.vision_model.*``).
"""

from __future__ import annotations

from jaxmm.checkpoint.hf import Rule
from jaxmm.models.core import params as core
from jaxmm.models.core.clip import clip_key_rules

_V = r"(?:model\.)?vision_tower\.(?:vision_model\.)?"
_P = r"(?:model\.)?multi_modal_projector\."
_T = r"(?:model\.language_model\.|language_model\.model\.)"

KEY_RULES: tuple[Rule, ...] = clip_key_rules(_V, _P, _T)
IGNORE = core.IGNORE + (r"(?:model\.)?vision_tower\.(?:vision_model\.)?embeddings\.position_ids",)
IGNORE_TIED = IGNORE + (r"(?:language_model\.)?lm_head\.weight",)
