"""Supervised fine-tuning on the same forward as everything else, resumable exactly.

    jaxmm train --config configs/train/<name>.yaml [key=value ...]

* Loss: token cross-entropy on assistant tokens only (``labels`` = −100 elsewhere, HF convention),
  plus optional extra terms computed from probes (``extra_losses``: callables
  ``(model_output, batch) -> scalar``, e.g. AVAR's AGTO losses).
* optax AdamW with linear warm-up + cosine decay, global-norm clipping, gradient accumulation
  (``optax.MultiSteps``); parameters frozen by path regexes (``freeze``); float32 master weights with
  optional bfloat16 compute (``compute_dtype``).
* orbax ``CheckpointManager`` (atomic, keep-last-N) holding the parameters, the optimizer state, the
  step and the data position, so a killed run resumes where it stopped and ends with the same
  parameters as an uninterrupted one. Metrics go to ``metrics.jsonl``.

Data: the grounded VQA generator (deterministic per index); sample ``i`` of epoch ``e`` is the
``(i, e)``-th item of a seeded grain shuffle, so the data position is just the number of samples seen.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmm.models.qwen2_5_vl.modeling import forward


@dataclasses.dataclass
class TrainConfig:
    """Schema of ``configs/train/*.yaml``."""

    model: str | None = None             # HF checkpoint dir to start from; None = the embedded organism
    out: str = "runs/train"
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: float = 0.1                   # fraction of steps
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    compute_dtype: str = "float32"       # or bfloat16 (master weights stay float32)
    freeze: list = dataclasses.field(default_factory=list)   # regexes over dotted parameter paths
    seq_len: int = 160                    # prompts + answers are left-padded to this many tokens
    data: dict = dataclasses.field(default_factory=lambda: {"name": "grounded", "size": 4096, "seed": 0,
                                                             "image_size": 112})
    save_every: int = 50
    keep: int = 2
    log_every: int = 10
    seed: int = 0

    @classmethod
    def from_yaml(cls, path, overrides: Sequence[str] = ()):
        import yaml

        from jaxmm.eval.harness import _set  # same dotted-override syntax as eval

        d = (yaml.safe_load(Path(path).read_text()) if path else {}) or {}
        for ov in overrides:
            k, v = ov.split("=", 1)
            _set(d, k.split("."), yaml.safe_load(v))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path or 'config'}: unknown field(s) {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------- data
def sft_example(model, sample: dict, seq_len: int) -> dict:
    """One grounded sample -> input_ids/labels [seq_len] (labels on the answer and <|im_end|>)."""
    from jaxmm.processing.chat import build_prompt

    proc, tok = model.image_processor, model.tokenizer
    pix = proc([sample["image"]])
    n_img = proc.num_image_tokens(pix["image_grid_thw"][0])
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]},
            {"role": "assistant", "content": sample["answer"]}]
    prompt = build_prompt(conv[:1], tok, [n_img])["input_ids"]
    full = build_prompt(conv, tok, [n_img], add_generation_prompt=False)["input_ids"]
    if len(full) > seq_len:
        raise ValueError(f"sample {sample['id']}: {len(full)} tokens exceed seq_len={seq_len}")
    labels = np.full(len(full), -100, np.int64)
    answer_end = len(full) - 1 if tok.decode(full[-1:]).strip() == "" else len(full)   # template's trailing "\n"
    labels[len(prompt):answer_end] = full[len(prompt):answer_end]
    pad = seq_len - len(full)
    return {"input_ids": np.pad(full, (pad, 0)), "attention_mask": np.pad(np.ones_like(full), (pad, 0)),
            "labels": np.pad(labels, (pad, 0), constant_values=-100), "pixel_values": pix["pixel_values"],
            "image_grid_thw": pix["image_grid_thw"]}


def dataset(cfg: TrainConfig):
    """A seeded, shuffled, repeating grain dataset of grounded samples."""
    import grain

    from jaxmm.data.grounded import make_sample

    d = dict(cfg.data)
    size, seed, image = int(d.get("size", 4096)), int(d.get("seed", 0)), int(d.get("image_size", 112))
    tasks = tuple(d.get("tasks", ("recognition", "counting", "grounding", "ocr", "spatial")))
    ds = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
    return ds.map(lambda i: make_sample(int(i), seed, (image, image), tasks[int(i) % len(tasks)]))


def make_batch(model, ds, start: int, n: int, seq_len: int):
    """Samples ``start … start+n−1`` of the dataset as a prepared Batch plus labels [B,S]."""
    exs = [sft_example(model, ds[start + i], seq_len) for i in range(n)]
    stack = lambda k: np.stack([e[k] for e in exs])
    batch = model.prepare(stack("input_ids"), stack("attention_mask"),
                          np.concatenate([e["pixel_values"] for e in exs]),
                          np.concatenate([e["image_grid_thw"] for e in exs]))
    return batch, stack("labels")


# ----------------------------------------------------------------------------- loss and step
def token_loss(logits, labels):
    """Mean cross-entropy over positions whose next-token label is not −100 (HF shift)."""
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    mask = labels != -100
    lp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(lp, jnp.where(mask, labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def trainable_mask(params, freeze: Sequence[str]):
    """Pytree of bools: False for parameters whose dotted path matches a ``freeze`` regex."""
    pats = [re.compile(p) for p in freeze]
    flags = [not any(p.search(_path_name(path)) for p in pats)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def optimizer(cfg: TrainConfig, params):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, int(cfg.warmup * cfg.steps)), max(cfg.steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(sched, weight_decay=cfg.weight_decay))
    if cfg.freeze:
        tx = optax.masked(tx, trainable_mask(params, cfg.freeze))
        tx = optax.chain(tx, optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda t: not t,
                                                                                     trainable_mask(params, cfg.freeze))))
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def make_step(config, tx, compute_dtype: str, extra_losses: Sequence[Callable] = (), probes=()):
    def loss_fn(params, batch, labels):
        p = params if compute_dtype == "float32" else jax.tree_util.tree_map(lambda x: x.astype(compute_dtype), params)
        out = forward(p, config, batch, (), tuple(probes))
        loss = token_loss(out.logits, labels)
        extras = [f(out, batch) for f in extra_losses]
        return loss + sum(extras), {"loss": loss}

    @jax.jit
    def step(params, opt_state, batch, labels):
        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"total": total, "grad_norm": optax.global_norm(grads), **aux}

    return step


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, progress: bool = True, extra_losses: Sequence[Callable] = (), probes=()) -> Path:
    """Runs (or resumes) SFT; returns the output directory (checkpoints, metrics.jsonl)."""
    import orbax.checkpoint as ocp

    import jaxmm
    from jaxmm import organism

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    model = jaxmm.load(cfg.model or organism.build(), dtype="float32")
    params = model.params
    tx = optimizer(cfg, params)
    opt_state = tx.init(params)
    mngr = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep))
    start = 0
    if mngr.latest_step() is not None:
        start = mngr.latest_step()
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonRestore()))
        params, opt_state = restored.state["params"], restored.state["opt_state"]
        if restored.data["samples_seen"] != start * cfg.batch_size:
            raise RuntimeError(f"{out}: checkpoint {start} has an inconsistent data position {restored.data}")
    step_fn = make_step(model.config, tx, cfg.compute_dtype, extra_losses, probes)
    ds = dataset(cfg)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    metrics = open(out / "metrics.jsonl", "a")
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        batch, labels = make_batch(model, ds, step * cfg.batch_size, cfg.batch_size, cfg.seq_len)
        params, opt_state, m = step_fn(params, opt_state, batch, labels)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, **{k: float(v) for k, v in m.items()}, "seconds": time.perf_counter() - t0}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            mngr.save(step + 1, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                data=ocp.args.JsonSave({"samples_seen": (step + 1) * cfg.batch_size})))
            mngr.wait_until_finished()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.3f}")
    metrics.close()
    if bar is not None:
        bar.close()
    mngr.wait_until_finished()
    model.params = params
    return out


def flat_params(tree) -> dict[str, np.ndarray]:
    """``{"visual.blocks.0.attn.qkv.kernel": array, …}`` for an ``nnx.State`` or a restored checkpoint."""
    return {_path_name(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _path_name(path) -> str:
    """A pytree key path -> "visual.blocks.0.attn.qkv.kernel" (a Variable's trailing .value dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def export_hf(params, config, src_dir, out_dir) -> Path:
    """Writes ``params`` as a Hugging Face checkpoint directory: ``model.safetensors`` (published key
    names) plus the config, tokenizer and preprocessor files of ``src_dir``; atomic rename."""
    import shutil

    from jaxmm.checkpoint.hf import save_safetensors
    from jaxmm.models.qwen2_5_vl.params import to_hf

    out_dir, src_dir = Path(out_dir), Path(src_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat = {tuple(int(x) if x.isdigit() else x for x in k.split(".")): v.astype(np.float32)
            for k, v in flat_params(params).items()}
    save_safetensors(to_hf(flat, config), tmp / "model.safetensors")
    for f in src_dir.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def final_params(out: str | Path):
    """The parameters (a nested dict) and step of the latest checkpoint in ``out``."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(Path(out).absolute() / "checkpoints")
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return restored.state["params"], step
