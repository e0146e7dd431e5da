"""Check: EasyDeL's Qwen2-VL (via easydel_runner.py) against transformers on one random-weight checkpoint.

    /work/main/.venv/bin/python experiments/bench/easydel_check.py [--easydel-python /tmp/venv-easydel/bin/python]
        [--new 16] [--batch 1] [--repeats 2] [--keep DIR]

Builds a small random-weight Qwen2-VL checkpoint with transformers (float32, save_pretrained), one
224x224 astronaut photo (Qwen2VLImageProcessorPil) + 32 random text tokens, computes transformers'
prefill last-position logits (eager attention) and greedy tokens (no early stop), runs
easydel_runner.py in EasyDeL's own virtual environment as a subprocess on the same files, and
prints the max |logits error| and the fraction of greedy tokens equal, plus EasyDeL's timings.
Needs the test extra (torch) here and an EasyDeL venv (no torch needed there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

SMALL = dict(
    text=dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=8192,
        mrope_section=[4, 6, 6],
    ),
    vision=dict(depth=4, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=4),
)


def build(path: Path):
    """A scaled-down Qwen2-VL (same structure as Qwen2-VL-7B), float32, saved with save_pretrained.

    Text weights drawn with std 0.1 (transformers' 0.02 gives a model that repeats one token, which would not
    test the KV cache or the decode positions); biases and norm weights randomised (see below)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    t = dict(SMALL["text"])
    section = t.pop("mrope_section")
    v = t["vocab_size"]
    cfg = Qwen2VLConfig(
        text_config=dict(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            bos_token_id=None,
            eos_token_id=1,
            pad_token_id=0,
            initializer_range=0.1,
            **t,
        ),
        vision_config=dict(SMALL["vision"]),
        image_token_id=v - 4,
        video_token_id=v - 3,
        vision_start_token_id=v - 2,
        vision_end_token_id=v - 1,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    # transformers initialises biases to 0 and norm weights to 1: randomise them so that a loader dropping the
    # q/k/v biases or a norm's weight/bias shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name or "ln_q" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model, cfg


def inputs(cfg, image_hw=(224, 224), text_len=32, batch=1, seed=0):
    """input_ids [B,S], attention_mask, pixel_values [N, C*T*P*P], image_grid_thw [B,3]: one image per row."""
    from PIL import Image
    from skimage import data
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
    ids = np.array([toks] * batch, np.int64)
    return dict(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        pixel_values=np.concatenate([pv["pixel_values"]] * batch).astype(np.float32),
        image_grid_thw=np.repeat(pv["image_grid_thw"], batch, 0).astype(np.int64),
    )


def hf_reference(model, cfg, batch, new):
    import torch

    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    mm = torch.from_numpy((batch["input_ids"] == cfg.image_token_id).astype(np.int64))
    model.config._attn_implementation = "eager"
    for sub in (model.model.visual.config, model.model.language_model.config):
        sub._attn_implementation = "eager"
    with torch.no_grad():
        logits = model(**t, mm_token_type_ids=mm).logits[0, -1].numpy()
        t0 = time.perf_counter()
        out = model.generate(**t, mm_token_type_ids=mm, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        dt = time.perf_counter() - t0
    return logits, out[:, batch["input_ids"].shape[1] :].numpy(), dt


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--easydel-python", default="/tmp/venv-easydel/bin/python")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", default=None, help="write checkpoint/inputs/result here instead of a temp dir")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        model, cfg = build(d / "ckpt")
        batch = inputs(cfg, batch=args.batch)
        np.savez(d / "inputs.npz", **batch)
        ref_logits, ref_tokens, hf_s = hf_reference(model, cfg, batch, args.new)
        print(
            f"prompt {batch['input_ids'].shape[1]} tokens x batch {args.batch}, "
            f"{batch['pixel_values'].shape[0]} patches; transformers greedy {args.new} tokens in {hf_s:.2f} s"
        )
        cmd = [
            args.easydel_python,
            str(HERE / "easydel_runner.py"),
            "--checkpoint",
            str(d / "ckpt"),
            "--inputs",
            str(d / "inputs.npz"),
            "--new",
            str(args.new),
            "--repeats",
            str(args.repeats),
            "--out",
            str(d / "easydel.json"),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n")
            return proc.returncode
        res = json.loads((d / "easydel.json").read_text())
        print(f"easydel runner: {time.perf_counter() - t0:.1f} s wall")

    err = float(np.abs(np.asarray(res["prefill_logits_last"], np.float32) - ref_logits).max())
    toks = np.asarray(res["tokens"])
    same = float((toks == ref_tokens).mean()) if toks.shape == ref_tokens.shape else 0.0
    print(
        f"easydel {res['easydel_version']} (jax {res['jax_version']}) vs transformers: "
        f"max |Δ last logits| {err:.2e}; greedy tokens equal {same:.3f} ({toks.shape})"
    )
    print(
        f"easydel prefill {res['prefill_s'] * 1e3:.1f} ms | decode {res['decode_tok_s'] or float('nan'):.1f} tok/s | "
        f"first-call compile {res['compile_s']:.1f} s"
    )
    print("timings:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res["timings"].items()}))
    print("settings:", json.dumps(res["settings"]))
    ok = err <= 1e-3 and same == 1.0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
