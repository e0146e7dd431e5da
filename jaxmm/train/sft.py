"""Supervised fine-tuning on the same forward as everything else, resumable exactly.

    jaxmm train --config configs/train/<name>.yaml [key=value ...]

* Loss: token cross-entropy on assistant tokens only (``labels`` = −100 elsewhere, HF convention),
  plus optional extra terms computed from probes (``extra_losses``: callables
  ``(model_output, batch) -> scalar``; AVAR's AGTO losses by config: ``agto: {alpha, beta}``).
* What is trained: the backbone (minus ``freeze`` regexes), LoRA adapters (``lora:``, backbone
  frozen; :mod:`jaxmm.train.lora`) and/or a RAVE module (``rave:``; :mod:`jaxmm.interventions.rave`),
  each its own checkpoint group; frozen leaves are ``stop_gradient``-ed, so their weight gradients
  are never computed.
* optax AdamW with linear warm-up + cosine decay, global-norm clipping, gradient accumulation
  (``optax.MultiSteps``); float32 master weights with optional bfloat16 compute (``compute_dtype``).
* orbax ``CheckpointManager`` (atomic, keep-last-N) holding the groups, the optimizer state, the
  step and the data position, so a killed run resumes where it stopped and ends with the same
  parameters as an uninterrupted one. Metrics go to ``metrics.jsonl`` and TensorBoard
  (``out/tensorboard``); a tqdm progress bar shows the loss.

Data: the grounded VQA generator (deterministic per index) or a file of question/answer/image rows
(``data: {name: vqa, path: train.jsonl}``: :func:`dataset`); sample ``i`` of epoch ``e`` is the
``(i, e)``-th item of a seeded grain shuffle, so the data position is just the number of samples seen.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
import re
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxmm.config import PosInt
from jaxmm.models.core.model import forward
from jaxmm.train.config import AgtoSpec, TrainingConfig


@dataclasses.dataclass
class TrainConfig(TrainingConfig):
    """Schema of ``configs/train/*.yaml`` (the shared fields: :class:`~jaxmm.train.config.TrainingConfig`);
    the annotations are what :meth:`from_yaml` and the constructor check.

    ``batch_size`` sequences of ``seq_len`` tokens (prompt + answer, left-padded) per step;
    ``compute_dtype`` the forward's (master weights stay float32); ``agto`` AVAR's AGTO losses
    ``{alpha, beta, eps, layers}`` added to the LM loss.
    """

    out: str = "runs/train"
    steps: PosInt = 100
    batch_size: PosInt = 8
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    agto: AgtoSpec | None = None
    seq_len: PosInt = 160


# ----------------------------------------------------------------------------- data
def target(sample: dict) -> str:
    """The assistant turn SFT learns for ``sample``: its ``response`` (a file's full answer, e.g.
    with reasoning), else its ``answer`` (a list of accepted answers: the most common one)."""
    if sample.get("response") is not None:
        return sample["response"]
    answer = sample["answer"]
    if isinstance(answer, list):
        return Counter(map(str, answer)).most_common(1)[0][0]
    return str(answer)


def sft_example(model, sample: dict, seq_len: int) -> dict:
    """One sample (:mod:`jaxmm.eval.benchmarks`' layout) -> input_ids/labels [seq_len] (labels on
    :func:`target` and <|im_end|>), as :func:`jaxmm.processing.batch.sft_example` of its system
    turn, image, question and target."""
    from jaxmm.processing.batch import sft_example as example, vqa_messages

    return example(
        model,
        vqa_messages(sample["question"], [sample["image"]], sample.get("system"), answer=target(sample)),
        seq_len,
        name=f"sample {sample.get('id')}",
    )


def dataset(cfg: TrainingConfig):
    """A seeded, shuffled, repeating grain dataset of samples in :mod:`jaxmm.eval.benchmarks`'
    layout (``question``, decoded PIL ``image``, ``answer``, ``score``, optional ``box``,
    ``response``, ``system``): the grounded generator, or a file (``data: {name, path, fields,
    limit, seed}``).

    Raises:
        FileNotFoundError / ValueError: a data file that is missing, not of its schema (naming the
            file and the missing field) or empty; at read time, a sample with no or several images
            (naming the file and the sample's id).
    """
    import grain

    from jaxmm.eval import benchmarks as B

    d = dict(cfg.data)
    seed = int(d.get("seed", 0))
    if d.get("name", "grounded") == "grounded":
        from jaxmm.data.grounded import TASKS, make_sample

        size, image = int(d.get("size", 4096)), int(d.get("image_size", 112))
        tasks = tuple(d.get("tasks", TASKS))
        style = {k: d[k] for k in ("shape_scale", "contrast") if k in d}
        ds = grain.MapDataset.range(size).shuffle(seed=seed).repeat()
        return ds.map(
            lambda i: B.to_sample("grounded", make_sample(int(i), seed, (image, image), tasks[int(i) % len(tasks)], **style))
        )
    path = d["path"]
    rows = B.load(d["name"], path, d.get("limit"), fields=d.get("fields"))
    if len(rows) == 0:
        raise ValueError(f"training data {path}: no rows")

    def decoded(s):
        try:
            image = B.decode_image(s["image"])
        except Exception as e:  # noqa: BLE001 — re-raised naming the file and sample
            raise ValueError(f"training data {path}, sample {s['id']!r}: {e}") from e
        if image is None:
            raise ValueError(f"training data {path}, sample {s['id']!r}: no image (jaxmm trains on one image per sample)")
        return {**s, "image": image}

    return rows.shuffle(seed=seed).repeat().map(decoded)


def make_batch(model, ds, start: int, n: int, seq_len: int):
    """Samples ``start … start+n−1`` of the dataset as a prepared Batch plus labels int64 [B,S]
    (:func:`jaxmm.processing.batch.sft_batch`)."""
    from jaxmm.processing.batch import sft_batch

    return sft_batch(model, [sft_example(model, ds[start + i], seq_len) for i in range(n)])


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
    flags = [not any(p.search(_path_name(path)) for p in pats) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def initial_state(cfg: TrainingConfig, params, config) -> dict:
    """The trained state as checkpoint groups: ``{"params": backbone, "lora": adapters (if
    cfg.lora), "rave": RAVE module (if cfg.rave)}``."""
    from jaxmm.interventions import rave
    from jaxmm.train import lora

    state = {"params": params}
    lcfg = lora.LoraConfig.from_dict(cfg.lora)
    if lcfg is not None:
        state["lora"] = lora.init(params, lcfg)
    rv = rave.from_config(config, cfg.rave)
    if rv is not None:
        state["rave"] = rv
    return state


def state_mask(cfg: TrainingConfig, state: dict):
    """Pytree of bools over ``state``: the backbone is trainable unless frozen by ``freeze`` or
    because LoRA is on; adapters (LoRA, RAVE) always are."""
    out = {}
    for group, tree in state.items():
        if group == "params":
            out[group] = jax.tree_util.tree_map(lambda _: False, tree) if cfg.lora else trainable_mask(tree, cfg.freeze)
        else:
            out[group] = jax.tree_util.tree_map(lambda _: True, tree)
    return out


def assemble(state: dict, cfg: TrainingConfig):
    """``state`` -> (parameters the forward runs with, interventions): LoRA merged, RAVE applied."""
    from jaxmm.train import lora

    params = lora.merge(state["params"], state.get("lora"), lora.LoraConfig.from_dict(cfg.lora))
    return params, ((state["rave"],) if "rave" in state else ())


def optimizer(cfg: TrainingConfig, state):
    """AdamW (warm-up + cosine), global-norm clipping, updates zeroed on frozen leaves of ``state``
    (a parameter tree or a :func:`initial_state` dict), gradient accumulation."""
    mask = state_mask(cfg, state) if isinstance(state, dict) and "params" in state else trainable_mask(state, cfg.freeze)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, int(cfg.warmup * cfg.steps)), max(cfg.steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adamw(sched, weight_decay=cfg.weight_decay))
    if not all(jax.tree_util.tree_leaves(mask)):
        tx = optax.chain(optax.masked(tx, mask), optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda t: not t, mask)))
    return optax.MultiSteps(tx, cfg.grad_accum) if cfg.grad_accum > 1 else tx


def make_step(config, tx, compute_dtype: str, extra_losses: Sequence[Callable] = (), probes=(), cfg: TrainConfig | None = None):
    """The jitted SFT step ``(state, opt_state, batch, labels) -> (state, opt_state, metrics)``.

    ``state`` is a parameter tree, or with ``cfg`` a :func:`initial_state` dict whose frozen leaves
    get no gradient (``stop_gradient``, so their weight gradients are never computed)."""
    mask = None

    def loss_fn(state, batch, labels):
        if cfg is not None:
            state = jax.tree_util.tree_map(lambda x, m: x if m else jax.lax.stop_gradient(x), state, mask)
            params, ivs = assemble(state, cfg)
        else:
            params, ivs = state, ()
        p = params if compute_dtype == "float32" else jax.tree_util.tree_map(lambda x: x.astype(compute_dtype), params)
        out = forward(p, config, batch, ivs, tuple(probes), remat=cfg is not None and cfg.remat)
        loss = token_loss(out.logits, labels)
        extras = [f(out, batch) for f in extra_losses]
        return loss + sum(extras), {"loss": loss}

    @jax.jit
    def step(state, opt_state, batch, labels):
        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, batch, labels)
        updates, opt_state = tx.update(grads, opt_state, state)
        state = optax.apply_updates(state, updates)
        return state, opt_state, {"total": total, "grad_norm": optax.tree.norm(grads), **aux}

    def run(state, opt_state, batch, labels):
        nonlocal mask
        if cfg is not None and mask is None:
            mask = state_mask(cfg, state)
        return step(state, opt_state, batch, labels)

    return run


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, progress: bool = True, extra_losses: Sequence[Callable] = (), probes=()) -> Path:
    """Runs (or resumes) SFT; returns the output directory (checkpoints, metrics.jsonl)."""
    import orbax.checkpoint as ocp

    import jaxmm
    from jaxmm import organism
    from jaxmm.sharding import config_mesh

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rank = jax.process_index()
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    mesh = config_mesh(cfg.mesh)
    model = jaxmm.load(organism.resolve(cfg.model), dtype="float32", mesh=mesh)
    model.set_pixels(cfg.min_pixels, cfg.max_pixels)
    if cfg.agto:
        from jaxmm.objectives.avar import agto_extra_loss, agto_probes

        layers = cfg.agto.get("layers")
        extra_losses = tuple(extra_losses) + (agto_extra_loss(**{k: v for k, v in cfg.agto.items() if k != "layers"}),)
        probes = tuple(probes) + agto_probes(None if layers is None else tuple(layers))
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
        if "rave" in state:  # orbax restores the module's leaves; keep its static fields
            state["rave"] = jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(initial_state(cfg, model.params, model.config)["rave"]),
                jax.tree_util.tree_leaves(state["rave"]),
            )
        if restored.data["samples_seen"] != start * cfg.batch_size:
            raise RuntimeError(f"{out}: checkpoint {start} has an inconsistent data position {restored.data}")
    step_fn = make_step(model.config, tx, cfg.compute_dtype, extra_losses, probes, cfg=cfg)
    ds = dataset(cfg)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    log = MetricsLog(out, tensorboard=cfg.tensorboard) if rank == 0 else None
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        batch, labels = make_batch(model, ds, step * cfg.batch_size, cfg.batch_size, cfg.seq_len)
        if mesh is not None:
            # every process builds the global batch (the generator is deterministic per index) and
            # keeps only its devices' rows: batch_shardings splits the batch over data x fsdp
            from jaxmm.sharding import batch_shardings

            sh = batch_shardings(batch, mesh)
            batch, labels = jax.device_put(batch, sh), jax.device_put(labels, sh.input_ids)
        state, opt_state, m = step_fn(state, opt_state, batch, labels)
        if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
            log.write(step + 1, {**{k: float(v) for k, v in m.items()}, "seconds": time.perf_counter() - t0})
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            mngr.save(
                step + 1,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave({**state, "opt_state": opt_state}),
                    data=ocp.args.JsonSave({"samples_seen": (step + 1) * cfg.batch_size}),
                ),
            )
            mngr.wait_until_finished()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(m['loss']):.3f}")
    if log is not None:
        log.close()
    if bar is not None:
        bar.close()
    mngr.wait_until_finished()
    model.params = state["params"]
    return out


class MetricsLog:
    """Metrics rows to ``out/metrics.jsonl`` (one JSON object per logged step, flushed) and, with
    ``tensorboard``, as scalars to ``out/tensorboard`` (tensorboardX event files)."""

    def __init__(self, out: Path, tensorboard: bool = True):
        self.file = open(Path(out) / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))

    def write(self, step: int, row: dict):
        """Appends ``{"step": step, **row}`` to metrics.jsonl (flushed) and each value as a
        TensorBoard scalar."""
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self):
        """Closes metrics.jsonl and the TensorBoard writer."""
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    from jaxmm.models.core.params import to_hf

    out_dir, src_dir = Path(out_dir), Path(src_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    flat = {
        tuple(int(x) if x.isdigit() else x for x in k.split(".")): v.astype(np.float32) for k, v in flat_params(params).items()
    }
    save_safetensors(to_hf(flat, config), tmp / "model.safetensors")
    for f in src_dir.iterdir():
        if f.name != "model.safetensors" and f.is_file():
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def final_state(out: str | Path, step: int | None = None):
    """The checkpoint groups (``params`` and, if trained, ``lora``, ``rave``; nested dicts) and step
    of the latest checkpoint in ``out`` (or of checkpoint ``step``).

    Raises:
        FileNotFoundError: no checkpoint in ``out``, or none at ``step`` (the kept steps are named).
    """
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(Path(out).absolute() / "checkpoints")
    if step is not None and step not in mngr.all_steps():
        raise FileNotFoundError(f"{out}: no checkpoint at step {step}; kept steps: {sorted(mngr.all_steps())}")
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{out}: no checkpoint (expected {Path(out) / 'checkpoints'}/<step>)")
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    return {k: v for k, v in restored.state.items() if k != "opt_state"}, step


def final_params(out: str | Path, step: int | None = None):
    """The parameters of the latest checkpoint in ``out`` (or of checkpoint ``step``) with LoRA merged
    (a nested dict), and its step."""
    from jaxmm.train import lora

    groups, step = final_state(out, step)
    cfg = json.loads((Path(out) / "config.json").read_text()) if (Path(out) / "config.json").exists() else {}
    return lora.merge(groups["params"], groups.get("lora"), lora.LoraConfig.from_dict(cfg.get("lora"))), step


def final_rave(out: str | Path, config):
    """The trained RAVE module of the latest checkpoint in ``out`` (its config from out/config.json)."""
    from jaxmm.interventions import rave

    groups, _ = final_state(out)
    cfg = json.loads((Path(out) / "config.json").read_text())
    if "rave" not in groups or not cfg.get("rave"):
        raise ValueError(f"{out}: this run trained no RAVE module (config field 'rave' is empty)")
    like = rave.from_config(config, cfg["rave"])
    g = groups["rave"]
    return type(like)(
        **{
            **{f: getattr(like, f) for f in ("layers", "heads", "kind", "towers")},
            **{k: jnp.asarray(v) for k, v in g.items() if v is not None},
        }
    )
