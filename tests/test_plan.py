"""jaxmm plan: parameter counts equal transformers', sharding divides per-device memory."""

import json

import numpy as np

import tiny
from jaxmm.plan import parse_mesh, plan


def test_counts_match_transformers_and_mesh_divides(tmp_path):
    model = tiny.build_hf_model("gqa_untied")
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(json.dumps(json.loads((tmp_path / "config.json").read_text())))  # JSON is YAML
    one = plan(cfg_path, {})
    assert one["parameters"] == sum(p.numel() for p in model.parameters())
    eight = plan(cfg_path, parse_mesh("data=2,fsdp=2,tensor=2"), batch=4)
    assert eight["params"] < one["params"] and eight["optimizer"] == 6 * eight["params"]
    assert np.isclose(eight["kv_cache"] * 2, plan(cfg_path, parse_mesh("data=2,fsdp=2,tensor=1"), batch=4)["kv_cache"])


def test_published_configs_plan():
    r = plan("configs/models/qwen2_5_vl_7b.yaml", {})
    assert 8.2e9 < r["parameters"] < 8.4e9  # Qwen2.5-VL-7B: 8.29 B parameters
    r = plan("configs/models/qwen2_5_vl_72b.yaml", parse_mesh("fsdp=8,tensor=8"))
    assert 73e9 < r["parameters"] < 74e9 and r["params"] < 3 * 2**30


def test_llava_configs_plan_and_take_their_presets():
    from jaxmm import interventions as I
    from jaxmm.plan import _load_config

    r7 = plan("configs/models/llava_1_5_7b.yaml", {})
    assert 7.0e9 < r7["parameters"] < 7.1e9  # llava-1.5-7b: 7.06 B parameters
    r13 = plan("configs/models/llava_1_5_13b.yaml", parse_mesh("fsdp=4,tensor=2"))
    assert 13.3e9 < r13["parameters"] < 13.4e9  # llava-1.5-13b: 13.35 B parameters
    for size, dims in (("7b", [2533, 1415]), ("13b", [2100, 4743])):
        _, cfg = _load_config(f"configs/models/llava_1_5_{size}.yaml")
        assert cfg.vision.tokens_per_image == 576 and cfg.text.num_key_value_heads == cfg.text.num_attention_heads
        (var,) = I.build(f"configs/methods/var_llava_1_5_{size}.yaml", cfg)
        assert list(var.dims) == dims
    (pai,) = I.build("configs/methods/pai_llava_1_5.yaml", _load_config("configs/models/llava_1_5_7b.yaml")[1])
    assert pai.layers == tuple(range(2, 32))


def test_llava_next_config_plans_as_transformers_counts():
    """llava-v1.6-vicuna-7b: the count of transformers' LlavaNextForConditionalGeneration built (on the
    meta device, no memory) from the same YAML, i.e. LLaVA-1.5-7B's plus image_newline; PAI's preset."""
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from jaxmm import interventions as I
    from jaxmm.config import read_yaml
    from jaxmm.plan import _load_config

    path = "configs/models/llava_v1_6_vicuna_7b.yaml"
    r = plan(path, parse_mesh("fsdp=4,tensor=2"))
    d, _ = read_yaml(path)
    with torch.device("meta"):
        hf = LlavaNextForConditionalGeneration(LlavaNextConfig(**{k: v for k, v in d.items() if k != "model_type"}))
    assert r["parameters"] == sum(p.numel() for p in hf.parameters())
    assert r["parameters"] == plan("configs/models/llava_1_5_7b.yaml", {})["parameters"] + 4096
    _, cfg = _load_config(path)
    assert cfg.vision.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    (pai,) = I.build("configs/methods/pai_llava_1_5.yaml", cfg)
    assert pai.layers == tuple(range(2, 32))
