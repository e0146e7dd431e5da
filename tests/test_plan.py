"""jaxmm plan: parameter counts equal transformers', sharding divides per-device memory."""

import json

import numpy as np

import tiny
from jaxmm.plan import parse_mesh, plan


def test_counts_match_transformers_and_mesh_divides(tmp_path):
    model = tiny.build_hf_model("gqa_untied")
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(json.dumps(json.loads((tmp_path / "config.json").read_text())))   # JSON is YAML
    one = plan(cfg_path, {})
    assert one["parameters"] == sum(p.numel() for p in model.parameters())
    eight = plan(cfg_path, parse_mesh("data=2,fsdp=2,tensor=2"), batch=4)
    assert eight["params"] < one["params"] and eight["optimizer"] == 6 * eight["params"]
    assert np.isclose(eight["kv_cache"] * 2, plan(cfg_path, parse_mesh("data=2,fsdp=2,tensor=1"), batch=4)["kv_cache"])


def test_published_configs_plan():
    r = plan("configs/models/qwen2_5_vl_7b.yaml", {})
    assert 8.2e9 < r["parameters"] < 8.4e9            # Qwen2.5-VL-7B: 8.29 B parameters
    r = plan("configs/models/qwen2_5_vl_72b.yaml", parse_mesh("fsdp=8,tensor=8"))
    assert 73e9 < r["parameters"] < 74e9 and r["params"] < 3 * 2 ** 30
