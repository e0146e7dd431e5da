"""The papers' full-scale recipes (``jaxmm/configs/eval/<paper>_*.yaml``, ``configs/train/*``): each
loads and validates as shipped, its methods build against the published model config it names, its
named prompts exist, and ``jaxmm plan`` places it on the devices the recipe says it needs."""

from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
MODELS = REPO / "configs" / "models"
GiB = 2**30

# recipe -> (published model config, devices it is planned on, memory per device in GiB)
EVAL_RECIPES = {
    "vrga_hallusionbench_qwen2_5_vl_3b": ("qwen2_5_vl_3b", 1, 80),
    "vrga_hallusionbench_qwen2_5_vl_3b_think": ("qwen2_5_vl_3b", 1, 80),
    "avar_vas_qwen2_5_vl_7b": ("qwen2_5_vl_7b", 1, 80),
    "ration_qwen2_5_vl_7b": ("qwen2_5_vl_7b", 1, 80),
    "pai_chair_llava_1_5_7b": ("llava_1_5_7b", 1, 80),
    "pope_llava_1_5_7b": ("llava_1_5_7b", 1, 80),
}


@pytest.mark.parametrize("name", sorted(EVAL_RECIPES))
def test_an_eval_recipe_validates_builds_and_plans(name):
    import jaxmm.interventions as I
    from jaxmm import prompts
    from jaxmm.eval.harness import EvalConfig, mesh_axes
    from jaxmm.plan import _load_config, plan

    model, devices, gib = EVAL_RECIPES[name]
    cfg = EvalConfig.from_yaml(name)
    assert cfg.dtype == "bfloat16" and cfg.methods[0] == "baseline" and len(cfg.methods) >= 2
    for b in cfg.benchmarks:
        if b.get("prompt"):
            assert "{question}" in prompts.get(b["prompt"]).user
    _, config = _load_config(MODELS / f"{model}.yaml")
    built = I.build([m for m in cfg.methods if m != "baseline"], config)
    assert len(built) == len(cfg.methods) - 1
    mesh = mesh_axes(cfg.mesh, devices)
    assert mesh["data"] * mesh["fsdp"] * mesh["tensor"] == devices
    seq = cfg.max_prompt_tokens + cfg.max_new_tokens
    r = plan(MODELS / f"{model}.yaml", mesh, seq=seq, batch=cfg.batch_size)
    inference = r["params"] + r["kv_cache"] + r["attention_chunk"]
    assert inference < gib * GiB, f"{name}: {inference / GiB:.1f} GiB per device on {mesh}"
