"""experiments/deficit/run.py's pieces that need no model: the inattention loss and the style overrides."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).parents[1]


def _module():
    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("deficit_run", ROOT / "experiments/deficit/run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inattention_loss_is_lambda_times_image_mass_of_the_rows_after_the_image():
    run = _module()
    loss, probes = run.inattention_loss(2.0)
    assert [p.name for p in probes] == ["visual_mass"]
    # B=1, S=6: padding, text, image, image, text, text -> rows 4 and 5 count
    image = np.array([[0, 0, 1, 1, 0, 0]], bool)
    attn = np.array([[0, 1, 1, 1, 1, 1]], np.int32)
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(3, 1, 2, 6)).astype(np.float32)  # [L,B,H,T]
    out = SimpleNamespace(probes={"visual_mass": {"text": SimpleNamespace(values=m)}})
    batch = SimpleNamespace(layout=SimpleNamespace(image_mask=image, attention_mask=attn))
    np.testing.assert_allclose(float(loss(out, batch)), 2.0 * m[..., 4:].mean(), rtol=1e-6)


def test_style_overrides_reach_the_train_config():
    from jaxmm.train.sft import TrainConfig

    run = _module()
    cfg = TrainConfig.from_yaml(ROOT / "configs/train/organism.yaml", run.style_overrides(run.DISTRACT))
    assert {k: cfg.data[k] for k in run.DISTRACT} == run.DISTRACT
