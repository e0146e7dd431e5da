"""Interventions on the attention seam, one method per file, selectable by name or config.

    from jaxmm import interventions as I
    ivs = I.build(["vrga", {"method": "avar", "alpha_sys": 0.05}], model.config)
    model.generate(messages, interventions=ivs)

Names: ``pai``, ``avar``, ``ration``, ``vrga``, ``var``, ``rave`` (a trained module:
``{"method": "rave", "path": DIR}``; see docs/methods.md), plus the building
blocks ``KeyLogitShift``, ``KeyWeightScale``, ``KeyBias``, ``HeadMask``. YAML configs with every
knob and its default live in ``configs/methods/``.
"""

from __future__ import annotations

from pathlib import Path

from jaxmm.interventions.avar import AVAR
from jaxmm.interventions.keys import KeyBias, KeyLogitShift, KeyWeightScale, key_set, per_sample
from jaxmm.interventions.pai import PAI, pai, pai_contrast
from jaxmm.interventions.ration import RATION
from jaxmm.interventions.rave import RAVE
from jaxmm.interventions.var import VAR, var
from jaxmm.interventions.vrga import VRGA, HeadMask, efr_head_mask

__all__ = ["AVAR", "PAI", "RATION", "RAVE", "VRGA", "VAR", "HeadMask", "KeyBias", "KeyLogitShift", "KeyWeightScale",
           "build", "efr_head_mask", "key_set", "pai", "pai_contrast", "per_sample", "var", "METHODS"]


def _layers(cfg, spec):
    """``None`` (all), a list of indices, or ``{"start": a, "end": b}`` -> static tuple or None."""
    n = cfg.text.num_hidden_layers
    if spec is None:
        return None
    if isinstance(spec, dict):
        return tuple(range(spec.get("start", 0), min(spec.get("end") or n, n)))
    return tuple(int(i) for i in spec)


def _pai(cfg, alpha=0.2, start=2, end=None, variant="paper", use_cfg=False):
    return pai(cfg.text.num_hidden_layers, alpha, start, end, variant, use_cfg)


def _avar(cfg, alpha_img=0.15, alpha_sys=0.0, on="logits", renormalize=False, layers=None, variant="paper"):
    return AVAR(alpha_img=alpha_img, alpha_sys=alpha_sys, on=on, renormalize=renormalize, layers=_layers(cfg, layers),
                variant=variant)


def _ration(cfg, top_k=4, d_a=None, d_b=None, thresholds=(0.0, 0.0, 0.0), key_layers=None, variant="paper"):
    """d_a, d_b default to 0.8, 1.2 (paper) or the lmms-eval wrapper's 1.0, 1.0 (released)."""
    d_a = d_a if d_a is not None else (1.0 if variant == "released" else 0.8)
    d_b = d_b if d_b is not None else (1.0 if variant == "released" else 1.2)
    return RATION(num_layers=cfg.text.num_hidden_layers, top_k=top_k, d_a=d_a, d_b=d_b,
                  thresholds=tuple(thresholds), key_layers=None if key_layers is None else tuple(key_layers),
                  variant=variant)


def _vrga(cfg, factor=1.5, fa=1, border_frac=0.2, min_focus=10, background_heads=64, variant="paper",
          head_mask=None, head_mask_topk=5, head_mask_after=5):
    return VRGA(factor=factor, fa=fa, border_frac=border_frac, min_focus=min_focus, background_heads=background_heads,
                variant=variant, head_mask=head_mask, head_mask_topk=head_mask_topk, head_mask_after=head_mask_after)


def _var(cfg, dims=(), tau=20.0, p=0.6, min_mass=0.2, max_share=0.5, start=2, variant="paper"):
    return VAR(dims=tuple(dims), tau=tau, p=p, min_mass=min_mass, max_share=max_share,
               layers=tuple(range(start, cfg.text.num_hidden_layers)), variant=variant)


def _rave(cfg, path=None, **init):
    """A trained RAVE module saved with :func:`jaxmm.interventions.rave.save` (``path``), or a fresh
    one (γ = 0: the model unchanged) from ``init``'s knobs."""
    from jaxmm.interventions import rave

    if path is not None:
        if init:
            raise TypeError(f"rave: give either path or init knobs, not both ({sorted(init)})")
        return rave.load(path)
    return rave.init(cfg, **init)


METHODS = {"pai": _pai, "avar": _avar, "ration": _ration, "vrga": _vrga, "var": _var, "rave": _rave}


def build(specs, config) -> tuple:
    """Interventions from names, dicts (``{"method": name, knob: value}``), YAML paths or ready
    intervention objects, in order (they compose in that order).

    Raises:
        ValueError: an unknown method name or knob, naming both.
    """
    if isinstance(specs, (str, dict)) or hasattr(specs, "applies"):
        specs = [specs]
    out = []
    for spec in specs:
        if hasattr(spec, "applies"):
            out.append(spec)
            continue
        if isinstance(spec, (str, Path)) and str(spec).endswith((".yaml", ".yml")):
            import yaml

            spec = yaml.safe_load(Path(spec).read_text())
        if isinstance(spec, str):
            name, _, rest = spec.partition(":")
            kw = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
            kw = {k: _parse(v) for k, v in kw.items()}
        else:
            kw = dict(spec)
            name = kw.pop("method", None)
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
        try:
            out.append(METHODS[name](config, **kw))
        except TypeError as e:
            raise ValueError(f"method {name!r}: {e}") from None
    return tuple(out)


def _parse(v: str):
    import yaml

    return yaml.safe_load(v)
