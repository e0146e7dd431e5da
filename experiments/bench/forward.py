"""Benchmark: jaxmm's jitted Qwen2.5-VL forward against transformers on the same weights and inputs.

    python experiments/bench/forward.py [--size small|medium] [--repeats 5] [--seq 2048]

Prints, in one run on one machine:
  * prefill latency of transformers (eager and sdpa) and jaxmm (fused path), and their ratio;
  * jaxmm with VAS + visual-entropy probes on every layer against probes off;
  * the compiled memory analysis (temp bytes) of the probed forward at ``--seq`` tokens, against the
    size an [L,B,H,S,S] weights buffer would have, to show it is never allocated.
Needs the test extra (torch). Figures go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    # a scaled-down Qwen2.5-VL: same structure, widths small enough for a 2-core CPU
    "small": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=8192,
            mrope_section=[4, 6, 6],
        ),
        vision=dict(depth=4, hidden_size=128, intermediate_size=344, num_heads=4, window_size=112, fullatt_block_indexes=[1, 3]),
    ),
    # small's widths at Qwen2.5-VL-7B's depth (28 text layers, 32 vision blocks): compile time by depth
    "deep": dict(
        text=dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=28,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=8192,
            mrope_section=[4, 6, 6],
        ),
        vision=dict(
            depth=32, hidden_size=128, intermediate_size=344, num_heads=4, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]
        ),
    ),
    "medium": dict(
        text=dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
            mrope_section=[8, 12, 12],
        ),
        vision=dict(depth=8, hidden_size=512, intermediate_size=1376, num_heads=8, window_size=112, fullatt_block_indexes=[3, 7]),
    ),
}


def build(size: str, path: Path):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = SIZES[size]
    t = dict(s["text"])
    section = t.pop("mrope_section")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
            **t,
        ),
        vision_config=dict(out_hidden_size=t["hidden_size"], **s["vision"]),
        image_token_id=t["vocab_size"] - 4,
        video_token_id=t["vocab_size"] - 3,
        vision_start_token_id=t["vocab_size"] - 2,
        vision_end_token_id=t["vocab_size"] - 1,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model, cfg


def inputs(cfg, image_hw=(448, 448), text_len=64, seed=0):
    from skimage import data
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = Image.fromarray(data.astronaut()).resize(image_hw[::-1])
    proc = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=image_hw[0] * image_hw[1])
    pv = proc([img], return_tensors="np")
    n = int(pv["image_grid_thw"][0].prod()) // 4
    rng = np.random.default_rng(seed)
    toks = (
        [int(x) for x in rng.integers(5, 1000, 8)]
        + [cfg.vision_start_token_id]
        + [cfg.image_token_id] * n
        + [cfg.vision_end_token_id]
        + [int(x) for x in rng.integers(5, 1000, text_len)]
    )
    ids = np.array([toks], np.int64)
    return dict(
        input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=pv["pixel_values"], image_grid_thw=pv["image_grid_thw"]
    )


def timeit(fn, repeats):
    """Best of ``repeats`` after one warm-up call (the minimum is the least noisy on a shared CPU)."""
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.min(ts))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small", choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seq", type=int, default=2048, help="sequence length of the memory check")
    args = ap.parse_args(argv)

    import jax
    import torch

    import jaxmm
    from jaxmm import probes as P
    from jaxmm.models import qwen2_5_vl

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as d:
        hf, cfg = build(args.size, Path(d))
        model = jaxmm.load(d)
    batch_np = inputs(cfg)
    seq = batch_np["input_ids"].shape[1]
    print(f"size={args.size}  sequence={seq} tokens  patches={batch_np['pixel_values'].shape[0]}")
    mm = torch.from_numpy((batch_np["input_ids"] == cfg.image_token_id).astype(np.int64))
    tb = {k: torch.from_numpy(v) for k, v in batch_np.items()}

    def hf_run(impl):
        hf.config._attn_implementation = impl
        for sub in (hf.model.visual.config, hf.model.language_model.config):
            sub._attn_implementation = impl
        with torch.no_grad():
            return hf(**tb, mm_token_type_ids=mm).logits

    t_eager = timeit(lambda: hf_run("eager"), args.repeats)
    t_sdpa = timeit(lambda: hf_run("sdpa"), args.repeats)
    batch = model.prepare(**batch_np)
    probes = (P.VAS(), P.VisualEntropy())
    off = lambda: qwen2_5_vl.forward_jit(model.params, model.config, batch).logits.block_until_ready()
    on = lambda: jax.block_until_ready(qwen2_5_vl.forward_jit(model.params, model.config, batch, (), probes))
    t_jax = timeit(off, args.repeats)
    t_probe = timeit(on, args.repeats)
    ref = hf_run("eager").numpy()
    err = float(np.abs(np.asarray(qwen2_5_vl.forward_jit(model.params, model.config, batch).logits) - ref).max())
    print(
        f"prefill  transformers eager {t_eager * 1e3:8.1f} ms | sdpa {t_sdpa * 1e3:8.1f} ms | "
        f"jaxmm {t_jax * 1e3:8.1f} ms  (max |Δlogits| {err:.1e})"
    )
    print(f"ratio    eager/jaxmm = {t_eager / t_jax:.2f}x   sdpa/jaxmm = {t_sdpa / t_jax:.2f}x")
    print(
        f"probes   VAS+entropy on all {cfg.text_config.num_hidden_layers} layers {t_probe * 1e3:8.1f} ms "
        f"= {t_probe / t_jax:.2f}x of probes off"
    )

    # Memory at --seq tokens: text-only rows of that length, probes on every layer.
    ids = np.random.default_rng(1).integers(5, 1000, (1, args.seq))
    long = model.prepare(input_ids=ids, attention_mask=np.ones_like(ids), system_spans=[[(0, 16)]])
    f = jax.jit(lambda p, b: qwen2_5_vl.forward(p, model.config, b, (), probes).probes)
    mem = f.lower(model.params, long).compile().memory_analysis()
    tc = cfg.text_config
    full = tc.num_hidden_layers * tc.num_attention_heads * args.seq * args.seq * 4
    one = tc.num_attention_heads * min(args.seq, 512) * args.seq * 4
    temp = getattr(mem, "temp_size_in_bytes", None)
    print(
        f"memory   seq={args.seq}: compiled temp {temp / 2**20 if temp is not None else float('nan'):.1f} MiB; "
        f"an [L,B,H,S,S] f32 buffer would be {full / 2**20:.1f} MiB; one layer's query chunk {one / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
