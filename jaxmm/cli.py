"""Command line: ``jaxmm eval | train | grpo | export | demo | generate | inspect | plan | convert``.

``jaxmm eval`` is the main job (the README's first command: the packaged ``organism`` config on the
embedded organism, :mod:`jaxmm.organism`). ``jaxmm demo`` is one probed forward of a Qwen-family
model on a photo, printing where the last token's attention goes, layer by layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _load_image(path: str | None):
    from PIL import Image

    if path is None:
        from skimage import data

        return Image.fromarray(data.chelsea()), "skimage.data.chelsea (300x451 photo)"
    try:
        return Image.open(path), path
    except (OSError, ValueError) as e:
        raise SystemExit(f"jaxmm: cannot read image {path!r}: {e}")


def demo(args) -> int:
    """``jaxmm demo``: one probed forward of the model on a photo (``--image``, default a
    scikit-image photo), printing where the last token's attention goes; returns 0."""
    import jaxmm
    from jaxmm import organism
    from jaxmm import probes as P
    from jaxmm.processing.image import ImageProcessor

    path = organism.resolve(args.model)
    model = jaxmm.load(path, dtype=args.dtype)
    proc = ImageProcessor.from_pretrained(path)
    image, name = _load_image(args.image)
    pix = proc([image])
    cfg = model.config
    n_img = int(pix["image_grid_thw"][0].prod()) // cfg.vision.spatial_merge_size**2
    rng = np.random.default_rng(0)
    system = [int(t) for t in rng.integers(3, 100, 6)]
    question = [int(t) for t in rng.integers(3, 100, 8)]
    ids = np.array(
        [system + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + question], np.int64
    )
    s = ids.shape[1]
    batch = model.prepare(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=pix["pixel_values"],
        image_grid_thw=pix["image_grid_thw"],
        system_spans=[[(0, len(system))]],
        question_spans=[[(s - len(question), s)]],
    )
    out = model.forward(batch=batch, probes=[P.VisualMass(), P.VisualEntropy(normalize=True), P.VAS()], interventions=args.method)
    print(f"model   {path}  ({cfg.text.num_hidden_layers} text layers, {cfg.vision.depth} vision blocks, dtype {model.dtype})")
    print(f"image   {name} -> grid {pix['image_grid_thw'][0].tolist()} patches, {n_img} image tokens; sequence {s} tokens")
    top = np.argsort(-np.asarray(out.logits[0, -1], np.float32))[:5]
    print(f"next-token top-5 ids: {top.tolist()}")
    print("last token, mean over heads:  layer  visual mass  visual entropy (norm.)  VAS (image/system)")
    vals = {k: np.asarray(out.probes[k]["text"].values, np.float32) for k in ("visual_mass", "visual_entropy", "vas")}
    for layer in range(cfg.text.num_hidden_layers):
        m, h, v = (vals[k][layer, 0, :, -1].mean() for k in ("visual_mass", "visual_entropy", "vas"))
        print(f"{'':31}{layer:5d}  {m:11.4f}  {h:22.4f}  {v:18.4f}")
    return 0


def generate(args) -> int:
    """``jaxmm generate``: answers ``--prompt`` about ``--image`` with the model (greedy unless
    ``--temperature``), the ``--method`` interventions applied, printed at once or streamed; returns 0."""
    import jax

    import jaxmm
    from jaxmm import organism
    from jaxmm.generate import Sampling, pai_contrast_for, stream
    from jaxmm.processing import batch as host

    path = organism.resolve(args.model)
    model = jaxmm.load(path, dtype=args.dtype)
    messages = host.vqa_messages(args.prompt, [_load_image(args.image)[0]] if args.image else [], args.system or None)
    key = jax.random.PRNGKey(args.seed)
    if args.method:
        print(f"methods: {', '.join(map(str, args.method))}", file=sys.stderr)
    if not args.stream:
        out = model.generate(
            messages,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            key=key,
            interventions=args.method,
            pai_contrast=args.pai_contrast,
        )
        print(out.text[0])
        return 0
    batch, _ = host.chat_batch(model, messages)
    tok = model.tokenizer
    stop = host.stop_tokens(model)
    ids = []
    printed = ""
    ivs = model.interventions(args.method)
    for step in stream(
        model.params,
        model.config,
        batch,
        max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_k, args.top_p),
        key=key,
        stop_tokens=stop,
        interventions=ivs,
        contrast=pai_contrast_for(batch, model.config, ivs, args.pai_contrast),
    ):
        ids.append(int(step[0]))
        text = tok.decode(ids, skip_special_tokens=True)
        print(text[len(printed) :], end="", flush=True)
        printed = text
    print()
    return 0


def evaluate(args) -> int:
    """``jaxmm eval``: runs (or resumes) the eval config with its overrides (:func:`jaxmm.eval.harness.run`),
    prints the score tables and where the results and report are; returns 0."""
    from jaxmm.eval.harness import EvalConfig, run
    from jaxmm.eval.report import load_rows, run_config, score_tables

    cfg = EvalConfig.from_yaml(args.config, args.overrides)
    if args.distributed:  # multi-host: coordinator and process id from the TPU/SLURM environment
        import jax

        jax.distributed.initialize()
    out = run(cfg, progress=not args.no_progress)
    import jax

    if jax.process_index() == 0:
        print(score_tables(load_rows(out), run_config(out)))
    print(f"results: {out / 'results.jsonl'}  report: {out / 'report.md'}")
    return 0


def train(args) -> int:
    """``jaxmm train``: runs (or resumes) SFT from the config with its overrides
    (:func:`jaxmm.train.sft.train`); returns 0."""
    from jaxmm.train.sft import TrainConfig, train as run

    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    out = run(cfg, progress=not args.no_progress)
    print(f"checkpoints: {out / 'checkpoints'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def grpo(args) -> int:
    """``jaxmm grpo``: runs (or resumes) GRPO from the config with its overrides
    (:func:`jaxmm.train.grpo.train`); returns 0."""
    from jaxmm.train.grpo import GRPOConfig, train as run

    out = run(GRPOConfig.from_yaml(args.config, args.overrides), progress=not args.no_progress)
    print(f"checkpoints: {out / 'checkpoints'}  metrics: {out / 'metrics.jsonl'}")
    return 0


def export(args) -> int:
    """``jaxmm export RUN OUT``: the latest checkpoint of training run ``RUN`` (or ``--step``) as a
    Hugging Face checkpoint directory ``OUT`` (LoRA merged; config, tokenizer and processor files of
    the run's starting checkpoint), loadable by ``jaxmm.load`` and transformers; returns 0. A RAVE
    module is not part of an HF checkpoint: load it with :func:`jaxmm.train.sft.final_rave`."""
    import json

    from jaxmm import organism
    from jaxmm.loading import family_of
    from jaxmm.train.sft import export_hf, final_params

    run = Path(args.run)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run}: not a training run directory (no config.json)")
    src = Path(organism.resolve(json.loads((run / "config.json").read_text()).get("model")))
    config = family_of(src).Config.from_pretrained(src)
    params, step = final_params(run, args.step)
    dest = export_hf(params, config, src, args.out)
    print(f"step {step} of {run} -> {dest}")
    return 0


def plan(args) -> int:
    """``jaxmm plan``: prints the per-device memory of a model config on ``--mesh`` for ``--batch``
    sequences of ``--seq`` tokens (:func:`jaxmm.plan.report`); returns 0."""
    from jaxmm.plan import parse_mesh, report

    print(report(args.model, parse_mesh(args.mesh), args.seq, args.batch))
    return 0


def convert(args) -> int:
    """``jaxmm convert``: writes an HF checkpoint directory as jaxmm's sharded store
    (:func:`jaxmm.checkpoint.store.convert`) and prints the peak host memory; returns 0."""
    import resource

    from jaxmm.checkpoint.store import convert as run

    out = run(args.hf_dir, args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"converted {args.hf_dir} -> {out} (peak host memory {peak:.0f} MiB)")
    return 0


def inspect(args) -> int:
    """Config and size of a checkpoint; with --image and --prompt, also the attention heatmap of the
    generated answer over the image (last layer, mean over heads and generated tokens)."""
    import jax

    import jaxmm
    from jaxmm import organism
    from jaxmm.attention import AttentionWeights
    from jaxmm.eval.report import render_heatmap
    from jaxmm.generate import generate
    from jaxmm.processing import batch as host

    path = organism.resolve(args.model)
    model = jaxmm.load(path, dtype=args.dtype)
    n = sum(x.size for x in jax.tree_util.tree_leaves(model.params))
    print(model.config)
    print(f"parameters: {n:,} ({model.dtype})")
    if not args.image:
        return 0
    if not args.prompt:
        raise SystemExit("jaxmm inspect: --image needs --prompt")
    image = _load_image(args.image)[0].convert("RGB")
    batch, _ = host.chat_batch(model, host.vqa_messages(args.prompt, [image]))
    last = model.config.text.num_hidden_layers - 1
    tok = model.tokenizer
    out = generate(
        model.params,
        model.config,
        batch,
        max_new_tokens=args.max_new_tokens,
        stop_tokens=host.stop_tokens(model),
        interventions=model.interventions(args.method),
        probes=(AttentionWeights(name="maps", layers=(last,)),),
    )
    length = max(int(out.lengths[0]), 1)
    text = tok.decode(np.asarray(out.tokens[0, :length]), skip_special_tokens=True)
    lay = batch.layout
    img = np.asarray(lay.image_mask[0])
    att = np.asarray(out.probes["maps"]["text"].values[0, :length, 0]).mean(axis=(0, 1))[: img.shape[0]][img]
    gh, gw = (int(x) for x in np.asarray(lay.grid_hw[0])[img][0])
    dest = Path(args.out)
    render_heatmap(image, att.reshape(gh, gw), dest, title=",".join(map(str, args.method)) or "baseline")
    print(f"answer: {text}")
    print(f"heatmap: {dest}")
    return 0


METHOD_HELP = (
    "intervention to apply, repeatable, in order: a name (pai, avar, ration, vrga, var), "
    "NAME:knob=value,knob=value, or a YAML file (configs/methods/)"
)


def main(argv=None) -> int:
    """The ``jaxmm`` command line (``argv``: the arguments, default ``sys.argv[1:]``); returns the exit
    status. Overrides (``key=value``) may come before, between or after options. A bad input
    (config, image, checkpoint) prints one line naming it and returns 2 (``--debug``: the traceback)."""
    ap = argparse.ArgumentParser(prog="jaxmm", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="one probed forward on a photo (default: the embedded organism)")
    d.add_argument(
        "--model",
        help="HF checkpoint directory, 'organism' (the default: the embedded organism) or "
        "'organism-random' (its seeded random-weight start)",
    )
    d.add_argument("--image", help="image file (default: a photo from scikit-image)")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--method", action="append", default=[], help=METHOD_HELP)
    d.set_defaults(fn=demo)
    g = sub.add_parser("generate", help="answer a prompt about an image (default model: the organism)")
    g.add_argument("--model", help="HF checkpoint directory with tokenizer, 'organism' (the default) or 'organism-random'")
    g.add_argument("--image", help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--system", help="system message (default: the chat template's)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--method", action="append", default=[], help=METHOD_HELP)
    g.add_argument("--pai-contrast", type=float, metavar="GAMMA", help="PAI's contrast with a text-only pass")
    g.set_defaults(fn=generate)
    e = sub.add_parser("eval", help="benchmarks x methods grid, resumable; writes results.jsonl and report.md")
    e.add_argument("--config", help="a packaged config's name (organism, the default) or a YAML file")
    e.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch_size=4 benchmarks.0.limit=8")
    e.add_argument("--no-progress", action="store_true")
    e.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (every host of a TPU pod / SLURM job runs the "
        "same command; samples are split across processes, process 0 writes the report)",
    )
    e.set_defaults(fn=evaluate)
    t = sub.add_parser("train", help="SFT (resumable) on the grounded VQA generator")
    t.add_argument("--config", help="YAML (configs/train/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=20 lr=1e-3")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(fn=train)
    g = sub.add_parser("grpo", help="GRPO (resumable): rollouts with generate, SAYO/AVAR rewards, k3 KL")
    g.add_argument("--config", help="YAML (configs/train/grpo_*.yaml)")
    g.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=20 group_size=8")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(fn=grpo)
    x = sub.add_parser("export", help="a training run's checkpoint -> a Hugging Face checkpoint directory (LoRA merged)")
    x.add_argument("run", help="the run directory (out of jaxmm train / jaxmm grpo)")
    x.add_argument("out", help="the HF checkpoint directory to write")
    x.add_argument("--step", type=int, default=None, help="a kept checkpoint step (default: the latest)")
    x.set_defaults(fn=export)
    pl = sub.add_parser("plan", help="per-device memory of a model config on a mesh (no devices used)")
    pl.add_argument("--model", required=True, help="a config YAML/JSON (configs/models/)")
    pl.add_argument("--mesh", default="data=1,fsdp=1,tensor=1", help="data=N,fsdp=N,tensor=N")
    pl.add_argument("--seq", type=int, default=4096)
    pl.add_argument("--batch", type=int, default=1)
    pl.set_defaults(fn=plan)
    cv = sub.add_parser("convert", help="HF safetensors -> tensorstore checkpoint, streamed tensor by tensor")
    cv.add_argument("hf_dir")
    cv.add_argument("out")
    cv.set_defaults(fn=convert)
    i = sub.add_parser("inspect", help="a checkpoint's config; with --image/--prompt, the answer's attention heatmap")
    i.add_argument("--model", help="HF checkpoint directory, 'organism' (the default) or 'organism-random'")
    i.add_argument("--image")
    i.add_argument("--prompt")
    i.add_argument("--method", action="append", default=[], help=METHOD_HELP)
    i.add_argument("--max-new-tokens", type=int, default=16)
    i.add_argument("--out", default="heatmap.png", help="PNG to write")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    i.set_defaults(fn=inspect)
    args, extra = ap.parse_known_args(argv)
    if hasattr(args, "overrides"):  # eval/train/grpo: key=value overrides before or after options
        rest = list(sys.argv[1:] if argv is None else argv)
        rest = rest[rest.index(args.command) + 1 :]  # the top level's only option is --debug
        vars(args).update(vars(sub.choices[args.command].parse_intermixed_args(rest)))
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError) as e:
        # bad input (a config field, a file, a run directory in use): one line, no traceback
        if args.debug or type(e).__module__.split(".")[0] in ("jax", "jaxlib"):
            raise
        print(f"jaxmm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
