"""Benchmark: jaxmm against transformers and EasyDeL on the same checkpoint and inputs, in one run.

    python experiments/bench/peers.py [--families qwen2_vl,qwen2_5_vl] [--new 64] [--repeats 3]
        [--image-tokens 256] [--batch 1] [--easydel-python /path/to/venv/bin/python]

Builds a mid-size random-weight checkpoint of each family with transformers (``MID``: ~50 M
parameters, float32, saved with ``save_pretrained``) and one prompt (a photo from
``skimage.data`` resized to give ``--image-tokens`` image tokens, plus 40 text tokens), then runs
each framework in its own process, one after another, on that checkpoint and those inputs:

* ``jaxmm`` and ``transformers`` (sdpa) in this interpreter's environment
  (``python peers.py --worker jaxmm|transformers ...``);
* ``easydel`` through ``experiments/bench/easydel_runner.py`` in EasyDeL's own environment
  (``--easydel-python``; EasyDeL 0.3.0 has no Qwen2.5-VL, so it runs on Qwen2-VL only). Skipped
  when no such interpreter is given.

Each worker reports: compile time (the first call of the N-token generation minus its best time:
tracing and XLA compilation; ~0 for transformers); prefill = one forward over the prompt that returns
the logits (best of ``--repeats`` after the first call); decode rate B·(N−1) / (t(N new) − t(1 new))
tokens/s with greedy decoding and no early stop, so the prefill cancels; its peak RSS (the
process's ``ru_maxrss``, so each framework's own); the greedy tokens, compared with transformers'.
"% of peak" is the prefill's matmul FLOPs (:func:`prefill_flops`) over
the CPU's measured matmul peak (a float32 2048² matmul in numpy, same run). The markdown table goes
to stdout; figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TEXT_LEN = 40
# ~50 M parameters: text 512 wide x 10 layers (GQA 8/4), vocabulary 16384 (untied); vision 6 blocks
MID_TEXT = dict(
    hidden_size=512, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4, vocab_size=16384
)
SECTION = [8, 12, 12]  # head_dim 64: 32 frequencies


def build(family: str, path: Path):
    """A random-weight mid-size checkpoint of ``family`` saved to ``path``; returns its HF config."""
    import torch
    import transformers as tr

    t = dict(
        MID_TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": SECTION},
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    v = t["vocab_size"]
    ids = dict(image_token_id=v - 4, video_token_id=v - 3, vision_start_token_id=v - 2, vision_end_token_id=v - 1)
    if family == "qwen2_5_vl":
        cfg = tr.Qwen2_5_VLConfig(
            text_config=t,
            vision_config=dict(
                depth=6,
                hidden_size=256,
                intermediate_size=1024,
                num_heads=4,
                window_size=112,
                fullatt_block_indexes=[2, 5],
                out_hidden_size=t["hidden_size"],
            ),
            **ids,
        )
        cls = tr.Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":
        cfg = tr.Qwen2VLConfig(
            text_config=t,
            vision_config=dict(depth=6, embed_dim=256, mlp_ratio=4, num_heads=4, hidden_size=t["hidden_size"]),
            **ids,
        )
        cls = tr.Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"--families: unknown family {family!r} (qwen2_vl, qwen2_5_vl)")
    torch.manual_seed(0)
    cls(cfg).eval().save_pretrained(path)
    return cfg


def make_inputs(cfg, image_tokens: int, batch: int, path: Path) -> dict:
    """One prompt with a photo of ``image_tokens`` merged tokens (a square of side 28·√n) and
    ``TEXT_LEN`` text tokens, repeated ``batch`` times; saved to ``path`` (npz)."""
    from PIL import Image
    from skimage import data
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    side = 28 * int(round(image_tokens**0.5))
    img = Image.fromarray(data.astronaut()).resize((side, side))
    pv = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)([img], return_tensors="np")
    n = int(pv["image_grid_thw"][0].prod()) // 4
    rng = np.random.default_rng(0)
    toks = (
        [int(x) for x in rng.integers(5, 1000, 8)]
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n
        + [cfg.vision_end_token_id]
        + [int(x) for x in rng.integers(5, 1000, TEXT_LEN - 8)]
    )
    ids = np.repeat(np.array([toks], np.int64), batch, 0)
    out = dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=np.concatenate([pv["pixel_values"]] * batch).astype(np.float32),
        image_grid_thw=np.repeat(pv["image_grid_thw"], batch, 0),
    )
    np.savez(path, **out)
    return out


def prefill_flops(ckpt: Path, cfg, inputs) -> float:
    """Matmul FLOPs of one prefill, from the checkpoint's weight shapes: 2·(matrix entries) per
    token through each matrix (text layers and lm head: every prompt token; vision blocks: every
    patch; merger: every merged token), plus attention's QKᵀ and PV (4·T²·width per layer; the
    vision tower counted as full attention over its patches)."""
    from safetensors import safe_open

    b, s = inputs["input_ids"].shape
    n = inputs["pixel_values"].shape[0]
    flops = 0.0
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            if len(shape) < 2 or "embed_tokens" in name:
                continue
            size = float(np.prod(shape))
            rows = n // 4 if "merger" in name else n if "visual" in name else b * s
            flops += 2 * rows * size
    t, vis = cfg.text_config, cfg.vision_config
    vis_width = getattr(vis, "embed_dim", None) or vis.hidden_size
    flops += t.num_hidden_layers * 4 * b * s * s * t.hidden_size + vis.depth * 4 * n * n * vis_width
    return flops


def cpu_peak() -> float:
    """float32 matmul FLOP/s of this CPU: best of 5 numpy 2048² matmuls."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn, repeats: int) -> float:
    return min(_timed(fn) for _ in range(repeats))


# ----------------------------------------------------------------------------- workers (own process)
def worker_jaxmm(ckpt: str, inputs: dict, new: int, repeats: int) -> dict:
    import jax

    import jaxmm
    from jaxmm.generate import generate

    model = jaxmm.load(ckpt)
    batch = model.prepare(**inputs)
    fam = model.family
    max_len = 64 * -(-(inputs["input_ids"].shape[1] + new) // 64)
    fwd = lambda: fam.forward_jit(model.params, model.config, batch).logits.block_until_ready()
    gen = lambda n: jax.block_until_ready(
        generate(model.params, model.config, batch, max_new_tokens=n, stop_tokens=[], max_len=max_len).tokens
    )
    _timed(fwd)
    first = _timed(lambda: gen(new))
    gen(1)
    out = dict(prefill_s=best_of(fwd, repeats), version=f"jaxmm, jax {jax.__version__}")
    t1, tn = best_of(lambda: gen(1), repeats), best_of(lambda: gen(new), repeats)
    out["compile_s"] = first - tn
    out["decode_tok_s"] = inputs["input_ids"].shape[0] * (new - 1) / (tn - t1)
    out["tokens"] = np.asarray(gen(new)).tolist()
    out["prefill_logits_last"] = np.asarray(fam.forward_jit(model.params, model.config, batch).logits[0, -1]).tolist()
    return out


def worker_transformers(ckpt: str, inputs: dict, new: int, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    t["mm_token_type_ids"] = (t["input_ids"] == model.config.image_token_id).long()

    def fwd():
        with torch.no_grad():
            return model(**t).logits

    def gen(n):
        with torch.no_grad():
            return model.generate(**t, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    _timed(fwd)
    first = _timed(lambda: gen(new))
    out = dict(
        prefill_s=best_of(fwd, repeats),
        version=f"transformers {transformers.__version__} sdpa, torch {torch.__version__} ({torch.get_num_threads()} threads)",
    )
    t1, tn = best_of(lambda: gen(1), repeats), best_of(lambda: gen(new), repeats)
    out["compile_s"] = first - tn
    out["decode_tok_s"] = inputs["input_ids"].shape[0] * (new - 1) / (tn - t1)
    out["tokens"] = gen(new)[:, inputs["input_ids"].shape[1] :].numpy().tolist()
    out["prefill_logits_last"] = fwd()[0, -1].numpy().tolist()
    return out


def run_worker(args) -> int:
    inputs = dict(np.load(args.inputs))
    fn = {"jaxmm": worker_jaxmm, "transformers": worker_transformers}[args.worker]
    out = fn(args.checkpoint, inputs, args.new, args.repeats)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- driver
def run_one(cmd: list[str], out: Path) -> dict | None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        print(f"  FAILED ({' '.join(cmd[:3])} ...): {r.stderr.strip().splitlines()[-1:] or r.returncode}", file=sys.stderr)
        return None
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="qwen2_vl,qwen2_5_vl")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-tokens", default="256", help="comma-separated, e.g. 256,1024,4096")
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument(
        "--easydel-python",
        default=os.environ.get("EASYDEL_PYTHON"),
        help="python of a venv with easydel==0.3.0 (its own jax); default $EASYDEL_PYTHON",
    )
    ap.add_argument("--worker", choices=("jaxmm", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args)

    peak = cpu_peak()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; numpy fp32 matmul "
        f"peak {peak / 1e9:.1f} GFLOP/s; greedy, {args.new} new tokens, best of {args.repeats}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for family in args.families.split(","):
            ckpt = d / family
            cfg = build(family, ckpt)
            for n_img in map(int, args.image_tokens.split(",")):
                for b in map(int, args.batch.split(",")):
                    npz = d / f"{family}-{n_img}-{b}.npz"
                    inputs = make_inputs(cfg, n_img, b, npz)
                    flops = prefill_flops(ckpt, cfg, inputs)
                    runs = {}
                    common = [
                        "--checkpoint",
                        str(ckpt),
                        "--inputs",
                        str(npz),
                        "--new",
                        str(args.new),
                        "--repeats",
                        str(args.repeats),
                    ]
                    for name in ("transformers", "jaxmm"):
                        out = d / f"{name}.json"
                        out.unlink(missing_ok=True)
                        runs[name] = run_one([sys.executable, __file__, "--worker", name, *common, "--out", str(out)], out)
                    if args.easydel_python and family == "qwen2_vl":
                        out = d / "easydel.json"
                        out.unlink(missing_ok=True)
                        runs["easydel"] = run_one(
                            [args.easydel_python, str(HERE / "easydel_runner.py"), *common, "--out", str(out)], out
                        )
                    ref = runs.get("transformers")
                    for name, r in runs.items():
                        if r is None:
                            continue
                        same = err = float("nan")
                        if ref is not None:
                            same = float((np.asarray(r["tokens"]) == np.asarray(ref["tokens"])).mean())
                            err = float(
                                np.abs(np.asarray(r["prefill_logits_last"]) - np.asarray(ref["prefill_logits_last"])).max()
                            )
                        rows.append((family, n_img, b, inputs["input_ids"].shape[1], name, r, flops, same, err))
                        print(
                            f"  {family} img={n_img} B={b}: {name:12s} prefill {r['prefill_s']:.3f} s, decode "
                            f"{r['decode_tok_s']:.1f} tok/s, compile {r['compile_s']:.1f} s, RSS "
                            f"{r['peak_rss_mib']:.0f} MiB ({r.get('version', '')})",
                            flush=True,
                        )
    print(
        "\n| family | image tokens | batch | tokens | framework | prefill s | % of CPU peak | decode tok/s | "
        "compile s | peak RSS MiB | tokens = HF | max Δ last logits |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for family, n_img, b, s, name, r, flops, same, err in rows:
        print(
            f"| {family} | {n_img} | {b} | {s} | {name} | {r['prefill_s']:.3f} | {100 * flops / r['prefill_s'] / peak:.0f} | "
            f"{r['decode_tok_s']:.0f} | {r['compile_s']:.1f} | {r['peak_rss_mib']:.0f} | {same:.2f} | {err:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
