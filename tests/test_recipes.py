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
    "sayo_qwen3_vl_8b": ("qwen3_vl_8b", 1, 80),
}
# recipes that compare checkpoints (base vs trained: `model=` override), not methods
CHECKPOINT_COMPARISONS = {"sayo_qwen3_vl_8b"}


@pytest.mark.parametrize("name", sorted(EVAL_RECIPES))
def test_an_eval_recipe_validates_builds_and_plans(name):
    import jaxmm.interventions as I
    from jaxmm import prompts
    from jaxmm.eval.harness import EvalConfig, mesh_axes
    from jaxmm.plan import _load_config, plan

    model, devices, gib = EVAL_RECIPES[name]
    cfg = EvalConfig.from_yaml(name)
    assert cfg.dtype == "bfloat16" and cfg.methods[0] == "baseline"
    assert len(cfg.methods) >= 2 or name in CHECKPOINT_COMPARISONS
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


# train recipe -> (published model config, devices it is planned on, memory per device in GiB)
TRAIN_RECIPES = {
    "grpo_sayo_qwen3_vl_8b": ("qwen3_vl_8b", 8, 80),
    "avar_cold_start_qwen2_5_vl_7b": ("qwen2_5_vl_7b", 8, 80),
    "grpo_avar_qwen2_5_vl_7b": ("qwen2_5_vl_7b", 8, 80),
}
MERGED_TOKEN_PIXELS = 28 * 28  # one merged image token of Qwen-VL covers 28 x 28 pixels
TEXT_TOKENS = 512  # system turn + question, an upper bound for the recipes' data [ours]


@pytest.mark.parametrize("name", sorted(TRAIN_RECIPES))
def test_a_train_recipe_validates_and_plans(name):
    """A full-scale training recipe: validates as shipped, reads a data file in the vqa schema with a
    pixel budget, its LoRA targets (if any) select matrices of the published model, its named system
    prompt exists, and one step fits the devices by ``jaxmm plan``: float32 parameters (training keeps
    float32 master weights), the optimizer state unless LoRA, and for GRPO the rollout's KV cache; one
    attention chunk. The backward keeps only the layers' inputs (``remat``), not modelled here."""
    import flax.nnx as nnx

    from jaxmm import prompts
    from jaxmm.eval.harness import mesh_axes
    from jaxmm.plan import _load_config, plan
    from jaxmm.train import lora
    from jaxmm.train.grpo import GRPOConfig
    from jaxmm.train.sft import TrainConfig

    model, devices, gib = TRAIN_RECIPES[name]
    grpo = name.startswith("grpo")
    cfg = (GRPOConfig if grpo else TrainConfig).from_yaml(REPO / "configs" / "train" / f"{name}.yaml")
    assert cfg.data["name"] == "vqa" and cfg.data["path"] and cfg.max_pixels and cfg.remat
    family, config = _load_config(MODELS / f"{model}.yaml")
    if cfg.lora:
        abstract = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(family.abstract_params(config, "float32"))}
        chosen = lora.targets_of(abstract, lora.LoraConfig.from_dict(cfg.lora))
        assert any(p.startswith("visual.") for p in chosen) and any(p.startswith("language_model.") for p in chosen)
    if grpo and cfg.system_prompt:
        assert prompts.get(cfg.system_prompt).system
    mesh = mesh_axes(cfg.mesh, devices)
    if grpo:
        seq = cfg.max_pixels // MERGED_TOKEN_PIXELS + TEXT_TOKENS + cfg.max_new_tokens
        batch = cfg.prompts_per_step * cfg.group_size
    else:
        seq, batch = cfg.seq_len, cfg.batch_size
    r = plan(MODELS / f"{model}.yaml", mesh, seq=seq, batch=batch, dtype_bytes=4)
    need = r["params"] + r["attention_chunk"] + (r["kv_cache"] if grpo else 0) + (0 if cfg.lora else r["optimizer"])
    assert need < gib * GiB, f"{name}: {need / GiB:.1f} GiB per device on {mesh}"
