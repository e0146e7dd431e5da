"""GRPO on the same forward and generation as everything else, resumable exactly.

    python -m jaxmm.train.grpo --config configs/train/grpo_sayo.yaml [key=value ...]

One step (methods.md "GRPO", SAYO, AVAR):

1. ``prompts_per_step`` grounded samples (seeded, the data position saved with each checkpoint),
   each repeated ``group_size`` G times; G completions per prompt sampled with
   :func:`jaxmm.generate.generate` (temperature, top-p; the PRNG key folded from (seed, step), so a
   resumed run samples the same completions).
2. One teacher-forced forward of prompt + completion under the rollout policy gives the old
   log-probs, the policy entropy (SAYO's token selection), the last layer's attention (``r_att``)
   and the image/system masses of every layer (AVAR's VARS, the logged VAS); one under the frozen
   reference gives the reference log-probs.
3. Rewards (weighted sum of ``accuracy``, ``format`` (SAYO), ``r_att`` (SAYO, top-``entropy_top``
   entropy tokens, last layer, region = the sample's evidence box) and ``vars`` (AVAR, ``paper`` or
   ``released``)); group-normalised advantages; the clipped objective with k3 KL
   (:mod:`jaxmm.objectives.grpo`); ``updates_per_rollout`` optax steps on it. ``loss_variant``,
   ``vars_variant`` and ``sayo_variant`` select the methods' released readings (docs/methods.md).

The trained state is the backbone or LoRA adapters (``lora:``; the reference is then the frozen
backbone itself). orbax checkpoints hold them, the optimizer state and the step; metrics go to
``metrics.jsonl`` and TensorBoard: every reward's mean, total reward, KL, VAS, region ratio,
entropy, completion length, loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import Field

from jaxmm.config import Float, Fraction, Int, NonNegFloat, NonNegInt, PosFloat, PosInt
from jaxmm.models.core.model import forward
from jaxmm.train.config import DataSpec, TrainingConfig

REWARDS = ("accuracy", "format", "r_att", "vars")


@dataclasses.dataclass
class GRPOConfig(TrainingConfig):
    """Schema of ``configs/train/grpo_*.yaml`` (the fields shared with SFT, optimiser included:
    :class:`~jaxmm.train.config.TrainingConfig`); the annotations are what :meth:`from_yaml` and the
    constructor check.

    Raises:
        jaxmm.config.ConfigError (a ValueError): a bad field, an unknown reward, ``group_size`` < 2,
            an unknown variant.
    """

    out: str = "runs/grpo"
    steps: PosInt = 50
    lr: PosFloat = 1e-4
    warmup: Fraction = 0.0
    data: DataSpec = dataclasses.field(
        default_factory=lambda: {
            "name": "grounded",
            "size": 4096,
            "seed": 3,
            "image_size": 112,
            "shape_scale": 0.35,
            "contrast": 0.5,
        }
    )
    save_every: PosInt = 10
    log_every: PosInt = 1
    prompts_per_step: PosInt = 4
    group_size: Int = 4  # G completions per prompt
    max_new_tokens: PosInt = 16
    temperature: PosFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    updates_per_rollout: PosInt = 1
    clip_eps: PosFloat = 0.2
    kl_beta: NonNegFloat = 0.001
    # loss_variant, checked in __post_init__ (its message names the choices): "paper", "easyr1" (AVAR's
    # released RL stage) or "trl" (SAYO's); see objectives.grpo
    loss_variant: str = "paper"
    clip_eps_high: PosFloat | None = None  # upper clip (None = clip_eps); EasyR1: 0.3
    dual_clip: PosFloat = 3.0  # "easyr1" only: dual clip on negative advantages
    adv_eps: PosFloat = 1e-4  # A = (r − mean)/(std + adv_eps); EasyR1: 1e-6
    rewards: dict[str, Float] = dataclasses.field(default_factory=lambda: {"r_att": 1.0})
    vars_variant: str = "paper"
    vars_layers: list[NonNegInt] | None = None  # VARS layers (None = all); AVAR's released script: 0..7
    sayo_variant: str = "paper"  # "released": SAYO's released token selection and format regex
    # the "format" reward: "sayo" (one <answer> block, length-weighted; by sayo_variant) or "avar"
    # (the whole completion <think>…</think><answer>…</answer>: jaxmm.objectives.avar.format_reward)
    format_reward: str = "sayo"
    system_prompt: str | None = None  # a system turn: literal text, or the name of a jaxmm.prompts prompt
    entropy_top: Annotated[float, Field(gt=0, le=1)] = 0.3  # SAYO: fraction of completion tokens r_att is computed on

    def __post_init__(self):
        super().__post_init__()
        bad = set(self.rewards) - set(REWARDS)
        if bad:
            raise ValueError(f"rewards: unknown reward(s) {sorted(bad)}; expected some of {REWARDS}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: group-normalised advantages need G >= 2")
        from jaxmm.objectives.grpo import LOSS_VARIANTS

        for name, allowed in (
            ("vars_variant", ("paper", "released")),
            ("sayo_variant", ("paper", "released")),
            ("format_reward", ("sayo", "avar")),
            ("loss_variant", LOSS_VARIANTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {allowed}")


def _prompts(model, samples, group_size, system_prompt=None):
    """G copies of each sample's chat prompt -> (prompt Batch (bucketed to 32 tokens), info, the
    repeated samples, region weights float32 [B,S_prompt] of their evidence boxes); built by
    :mod:`jaxmm.processing.batch`. ``system_prompt``: a system turn first (text, or the name of a
    :data:`jaxmm.prompts.PROMPTS` prompt with a system turn, e.g. ``sayo``); without it, a sample's
    own ``system`` turn (from a data file), if it has one."""
    from jaxmm.processing import batch as host
    from jaxmm.prompts import PROMPTS

    named = PROMPTS.get(system_prompt)
    text = named.system if named is not None and named.system is not None else system_prompt
    rep = [s for s in samples for _ in range(group_size)]
    batch, info = host.chat_batch(
        model,
        [host.vqa_messages(s["question"], [s["image"]], s.get("system") if text is None else text) for s in rep],
        pad_to_multiple_of=32,
    )
    w = host.region_weights(model, batch.layout, info["image_grid_thw"], *host.sample_boxes(rep))
    return batch, info, rep, w


def completion_logprobs(logits, tokens, prompt_len: int, temperature: float):
    """log π(token_t) [B,T] of the completion tokens from teacher-forced logits [B,S+T,V]."""
    t = tokens.shape[1]
    lg = logits[:, prompt_len - 1 : prompt_len - 1 + t].astype(jnp.float32) / temperature
    lp = jax.nn.log_softmax(lg, -1)
    return jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), -1)[..., 0], lg


def make_score_fn(config, cfg: GRPOConfig):
    """Jitted ``(params, batch, tokens, prompt_len) -> dict``: log-probs, entropies, last-layer
    attention at the completion queries, image/system masses and region ratio ā_R/ā_V of every
    layer at them."""
    from jaxmm.attention import AttentionWeights
    from jaxmm.objectives.sayo import token_entropy
    from jaxmm.probes import KeyMass, RegionRatio, VisualMass

    last = config.text.num_hidden_layers - 1
    probes = (
        AttentionWeights(name="last_layer", layers=(last,)),
        VisualMass(),
        KeyMass(),
        RegionRatio(eps=1e-12),
    )  # as the eval harness logs it
    released = cfg.vars_variant == "released"
    if released:
        from jaxmm.objectives.avar import FirstKeysMass

        # released: Qwen-AVAR EasyR1/verl/utils/avar_attention.py:59-60 (layers past the model's are skipped)
        layers = _vars_layers(config.text.num_hidden_layers, cfg)
        probes += (VisualMass(name="vars_image_mass", layers=layers), FirstKeysMass(layers=layers))

    @jax.jit
    def score(params, ivs, batch, tokens):
        s = batch.input_ids.shape[1] - tokens.shape[1]
        out = forward(params, config, batch, ivs, probes)
        lp, lg = completion_logprobs(out.logits, tokens, s, cfg.temperature)
        q = slice(s, s + tokens.shape[1])
        return {
            "logp": lp,
            "entropy": token_entropy(lg),
            "weights": out.probes["last_layer"]["text"].values[0][:, :, q],  # [B,H,T,K]
            "m_v": out.probes["visual_mass"]["text"].values[..., q],  # [L,B,H,T]
            "m_s": out.probes["system_mass"]["text"].values[..., q],
            "region_ratio": out.probes["region_ratio"]["text"].values[..., q],  # [L,B,H,T]
            **(
                {
                    "vars_m_v": out.probes["vars_image_mass"]["text"].values,  # [L',B,H,S+T]
                    "vars_m_s": out.probes["first_keys_mass"]["text"].values,
                }
                if released
                else {}
            ),
        }

    return score


def _vars_layers(n: int, cfg: GRPOConfig):
    return None if cfg.vars_layers is None else tuple(int(l) for l in cfg.vars_layers if int(l) < n)


def rewards_of(cfg: GRPOConfig, samples, texts, lengths, scored, batch, mask) -> dict[str, np.ndarray]:
    """Every configured reward [B] plus the logged ``vas`` and ``region_ratio`` [B] (numpy): means
    over each completion's tokens, all layers and heads, of m_V/(m_S+1e-6) and ā_R/ā_V, as the eval
    harness computes them (non-finite entries, e.g. an empty image mass, left out)."""
    from jaxmm.eval.harness import score as score_answer
    from jaxmm.objectives.avar import format_reward as avar_format, vars_reward
    from jaxmm.objectives.sayo import format_reward, r_att, select_high_entropy

    acc = np.array([score_answer(s, t)[1] for s, t in zip(samples, texts)], np.float32)
    if cfg.format_reward == "avar":
        fmt = np.array([avar_format(t) for t in texts], np.float32)
    else:
        fmt = np.array([format_reward(t, int(n), variant=cfg.sayo_variant) for t, n in zip(texts, lengths)], np.float32)
    selected = select_high_entropy(scored["entropy"], jnp.asarray(mask), cfg.entropy_top, variant=cfg.sayo_variant)
    lay = batch.layout
    ratt = np.asarray(r_att(scored["weights"], lay.image_mask, lay.region_weight > 0, selected))
    if cfg.vars_variant == "released":
        # released: Qwen-AVAR EasyR1/verl/utils/avar_attention.py:82-90 (every query row of prompt + response;
        # pad rows left out [ours]); ray_trainer.py:707-709 adds it at every response position and
        # core_algos.py:199 sums them: × the completion width
        rows = jnp.asarray(batch.attention_mask, bool)
        vars_ = np.asarray(vars_reward(scored["vars_m_v"], scored["vars_m_s"], rows, None, variant="released"))
        vars_ = vars_ * np.float32(mask.shape[1])
    else:
        m_v, m_s = scored["m_v"], scored["m_s"]
        if cfg.vars_layers is not None:
            keep = jnp.asarray(_vars_layers(m_v.shape[0], cfg), int)
            m_v, m_s = m_v[keep], m_s[keep]
        vars_ = np.asarray(vars_reward(m_v, m_s, jnp.asarray(mask), jnp.asarray(acc > 0), variant=cfg.vars_variant))
    vas = np.asarray(vars_reward(scored["m_v"], scored["m_s"], jnp.asarray(mask), jnp.ones(len(acc), bool)))
    rr = np.moveaxis(np.asarray(scored["region_ratio"], np.float64), 1, 0)  # [B,L,H,T]
    keep = np.isfinite(rr) & np.asarray(mask)[:, None, None, :]
    with np.errstate(invalid="ignore"):
        region = np.sum(np.where(keep, rr, 0.0), axis=(1, 2, 3)) / np.sum(keep, axis=(1, 2, 3))
    return {"accuracy": acc, "format": fmt, "r_att": ratt, "vars": vars_, "vas": vas, "region_ratio": region.astype(np.float32)}


# ----------------------------------------------------------------------------- the update
def make_update(config, cfg: GRPOConfig, tx, mask_tree):
    """Jitted ``(state, opt_state, batch, tokens, mask, old_lp, ref_lp, adv) -> (state, opt_state,
    metrics)``; ``mask_tree`` (static bools, :func:`~jaxmm.train.sft.state_mask`): what is trained."""
    from jaxmm.objectives.grpo import grpo_loss, k3_kl
    from jaxmm.train.sft import assemble

    def loss_fn(state, batch, tokens, mask, old_lp, ref_lp, adv):
        state = jax.tree_util.tree_map(lambda x, m: x if m else jax.lax.stop_gradient(x), state, mask_tree)
        params, ivs = assemble(state, cfg)
        s = batch.input_ids.shape[1] - tokens.shape[1]
        lp, _ = completion_logprobs(forward(params, config, batch, ivs, remat=cfg.remat).logits, tokens, s, cfg.temperature)
        loss = grpo_loss(
            lp,
            old_lp,
            ref_lp,
            adv,
            mask,
            beta=cfg.kl_beta,
            clip_eps=cfg.clip_eps,
            variant=cfg.loss_variant,
            clip_eps_high=cfg.clip_eps_high,
            dual_clip=cfg.dual_clip,
        )
        m = mask.astype(jnp.float32)
        kl = jnp.sum(k3_kl(lp, ref_lp) * m) / jnp.maximum(jnp.sum(m), 1.0)
        return loss, {"kl": kl}

    @jax.jit
    def update(state, opt_state, batch, tokens, mask, old_lp, ref_lp, adv):
        import optax

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, batch, tokens, mask, old_lp, ref_lp, adv)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}

    return update


def placeholder_ids(config) -> tuple[int, ...]:
    """The vision placeholder tokens (image and video pads, vision start and end) of ``config``.

    Rollouts never sample them: a completion holding an image pad token would have image features
    spliced in (and M-RoPE image positions) when it is scored teacher-forced, so it could not be
    scored as the text it was generated as. Only the sampler suppresses them (transformers'
    ``suppress_tokens`` in generation); the log-probs π and π_old stay the model's softmax over
    the whole vocabulary."""
    ids = (getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))
    return tuple(sorted({int(i) for i in ids if i is not None and 0 <= int(i) < config.text.vocab_size}))


def rollout(model, cfg: GRPOConfig, state, ref_params, samples, step: int, score_fn, mesh=None):
    """Samples G completions per prompt under the current policy and scores them. Returns the
    teacher-forced batch, tokens, mask, old and reference log-probs, rewards and texts.

    With ``mesh`` (a :class:`jax.sharding.Mesh`, possibly over several processes) every process
    builds the same global prompts; generation and scoring run as one program over the mesh with
    the rows split over data × fsdp (:func:`jaxmm.sharding.batch_shardings`); the completions and
    scores are gathered to every process, so rewards and advantages are the same everywhere."""
    from jaxmm.generate import Sampling, generate
    from jaxmm.processing import batch as host
    from jaxmm.sharding import on_host, split_rows
    from jaxmm.train.sft import assemble

    params, ivs = assemble(state, cfg)
    prompt, info, rep, region = _prompts(model, samples, cfg.group_size, cfg.system_prompt)
    stop = host.stop_tokens(model)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
    out = generate(
        params,
        model.config,
        prompt,
        max_new_tokens=cfg.max_new_tokens,
        sampling=Sampling(temperature=cfg.temperature, top_p=cfg.top_p),
        key=key,
        stop_tokens=stop,
        pad_token_id=host.pad_token_id(model),
        interventions=ivs,
        mesh=mesh,
        suppress_tokens=placeholder_ids(model.config),
    )
    tokens, lengths = (np.asarray(x) for x in on_host((out.tokens, out.lengths)))
    texts = [model.tokenizer.decode(tokens[b, : lengths[b]], skip_special_tokens=True) for b in range(len(rep))]
    batch, mask = host.completion_batch(model, prompt, info["image_grid_thw"], tokens, lengths, region)
    dev_tokens, dev_mask = jnp.asarray(tokens), jnp.asarray(mask)
    if mesh is not None:
        from jaxmm.sharding import batch_shardings

        batch = jax.device_put(batch, batch_shardings(batch, mesh))
        dev_tokens, dev_mask = split_rows(tokens, mesh), split_rows(mask, mesh)
    scored = on_host(score_fn(params, ivs, batch, dev_tokens))
    ref_lp = on_host(score_fn(ref_params, (), batch, dev_tokens)["logp"])
    host_batch = on_host(batch)
    rewards = rewards_of(cfg, rep, texts, lengths, scored, host_batch, mask)
    return batch, dev_tokens, dev_mask, scored, ref_lp, rewards, texts, lengths


def total_reward(cfg: GRPOConfig, rewards: dict) -> np.ndarray:
    """Σ_k w_k · r_k over the config's ``rewards`` weights: float [n_completions] from the
    per-reward arrays of :func:`rewards_of`."""
    return sum(float(w) * rewards[k] for k, w in cfg.rewards.items())


# ----------------------------------------------------------------------------- the loop
def train(cfg: GRPOConfig, progress: bool = True) -> Path:
    """Runs (or resumes) GRPO; returns the output directory (checkpoints, metrics.jsonl)."""
    import json

    import orbax.checkpoint as ocp

    import jaxmm
    from jaxmm import organism
    from jaxmm.objectives.grpo import group_advantages
    from jaxmm.sharding import config_mesh, on_host, split_rows
    from jaxmm.train.sft import MetricsLog, dataset, initial_state, optimizer, state_mask

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rank = jax.process_index()
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    mesh = config_mesh(cfg.mesh)
    model = jaxmm.load(organism.resolve(cfg.model), dtype="float32", mesh=mesh)
    model.set_pixels(cfg.min_pixels, cfg.max_pixels)
    ref_params = model.params  # the frozen reference: the starting model
    state = initial_state(cfg, model.params, model.config)
    if mesh is not None:  # adapters replicated over the mesh, next to the sharded backbone
        from jax.sharding import NamedSharding, PartitionSpec

        rep = NamedSharding(mesh, PartitionSpec())
        state = {k: v if k == "params" else jax.device_put(v, rep) for k, v in state.items()}
    tx = optimizer(cfg, state)
    opt_state = tx.init(state)
    mngr = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep))
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        restored = mngr.restore(
            start,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore({**state, "opt_state": opt_state}), data=ocp.args.JsonRestore()
            ),
        )
        opt_state = restored.state["opt_state"]
        state = {k: restored.state[k] for k in state}
        if restored.data["prompts_seen"] != start * cfg.prompts_per_step:
            raise RuntimeError(f"{out}: checkpoint {start} has an inconsistent data position {restored.data}")
    mask_tree = state_mask(cfg, state)
    score_fn = make_score_fn(model.config, cfg)
    update = make_update(model.config, cfg, tx, mask_tree)
    ds = dataset(cfg)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="grpo", unit="step", dynamic_ncols=True)
    log = MetricsLog(out, tensorboard=cfg.tensorboard) if rank == 0 else None
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        samples = [ds[step * cfg.prompts_per_step + i] for i in range(cfg.prompts_per_step)]
        batch, tokens, mask, scored, ref_lp, rewards, _, lengths = rollout(
            model, cfg, state, ref_params, samples, step, score_fn, mesh
        )
        r = total_reward(cfg, rewards)
        adv = group_advantages(jnp.asarray(r, jnp.float32), cfg.group_size, eps=cfg.adv_eps)
        old_lp = scored["logp"]
        if mesh is not None:  # the per-row inputs of the update split over the mesh as the batch is
            old_lp, ref_lp, adv = (split_rows(x, mesh) for x in (old_lp, ref_lp, adv))
        for _ in range(cfg.updates_per_rollout):
            state, opt_state, m = update(state, opt_state, batch, tokens, mask, old_lp, ref_lp, adv)
        host_mask = on_host(mask)  # a collective where the mesh spans processes: every process
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            ent = np.asarray(scored["entropy"])[host_mask]
            row = {
                **{f"reward/{k}": float(np.mean(v)) for k, v in rewards.items() if k in REWARDS},
                "reward/total": float(np.mean(r)),
                "vas": float(np.mean(rewards["vas"])),
                "region_ratio": float(np.nanmean(rewards["region_ratio"])),
                "entropy": float(ent.mean()) if ent.size else 0.0,
                "length": float(np.mean(lengths)),
                **{k: float(v) for k, v in m.items()},
                "seconds": time.perf_counter() - t0,
            }
            log.write(step + 1, row)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            mngr.save(
                step + 1,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({**state, "opt_state": opt_state}),
                    data=ocp.args.JsonSave({"prompts_seen": (step + 1) * cfg.prompts_per_step}),
                ),
            )
            mngr.wait_until_finished()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{float(np.mean(r)):.3f}")
    if log is not None:
        log.close()
    if bar is not None:
        bar.close()
    mngr.wait_until_finished()
    return out


def main(argv=None) -> int:
    """``python -m jaxmm.train.grpo --config YAML [key=value ...]``: runs (or resumes) GRPO; returns 0."""
    ap = argparse.ArgumentParser(prog="python -m jaxmm.train.grpo", description="GRPO (resumable)")
    ap.add_argument("--config", help="YAML (configs/train/grpo_*.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value (dotted keys)")
    args = ap.parse_intermixed_args(argv)
    out = train(GRPOConfig.from_yaml(args.config, args.overrides))
    print(f"GRPO run: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
