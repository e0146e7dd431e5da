"""jaxmm: multimodal LLMs in JAX with an attention seam for research on visual attention.

Public API::

    model = jaxmm.load("path/to/hf_dir", dtype="float32")
    out = model.forward(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...,
                        interventions=[...], probes=[...])
    out.logits  # [B, S, V]

Names are imported lazily so that host-side modules (``jaxmm.processing``) load without the model.
"""

import importlib

_EXPORTS = {
    "load": "jaxmm.loading",
    "Model": "jaxmm.loading",
    "attend": "jaxmm.attention",
    "Site": "jaxmm.attention",
    "Intervention": "jaxmm.attention",
    "Probe": "jaxmm.attention",
    "AttentionWeights": "jaxmm.attention",
}

__all__ = sorted(_EXPORTS) + ["probes", "interventions"]


_MODULES = ("probes", "interventions", "generate", "attention")


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"jaxmm.{name}")
    raise AttributeError(f"module 'jaxmm' has no attribute {name!r}")
