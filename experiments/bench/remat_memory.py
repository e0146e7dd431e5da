"""Peak memory of one SFT gradient with and without ``remat`` (``forward(remat=True)``: each decoder
layer under ``jax.checkpoint``, attention in query chunks whose scores the backward recomputes).

    python experiments/bench/remat_memory.py [--batch 4] [--repeat 60]

The mid-size random-weight Qwen2.5-VL of ``peers.py`` (text 512 wide x 10 layers, vocabulary 16384)
with the organism's tokenizer, a text-only prompt of ``--repeat`` sentences (1786 tokens at 60),
``--batch`` rows, float32. Each setting runs in its own process; prints the peak RSS of each.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def worker(ckpt: str, remat: bool, batch: int, repeat: int) -> None:
    import resource

    import jax
    import numpy as np

    import jaxmm
    from jaxmm.models.core.model import forward
    from jaxmm.processing.batch import chat_batch, vqa_messages
    from jaxmm.train.sft import token_loss

    model = jaxmm.load(Path(ckpt))
    b, _ = chat_batch(model, [vqa_messages("Describe the photo in detail please. " * repeat, [])] * batch)
    labels = np.where(np.asarray(b.attention_mask) > 0, np.asarray(b.input_ids), -100)
    grad = jax.jit(jax.grad(lambda p: token_loss(forward(p, model.config, b, remat=remat).logits, labels)))
    jax.block_until_ready(grad(model.params))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"tokens {b.input_ids.shape}  remat {remat}  peak RSS {rss:.0f} MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1] == "1", args.batch, args.repeat)
        return 0
    sys.path.insert(0, str(HERE))
    import peers

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "mid"
        peers.build("qwen2_5_vl", ckpt)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(ROOT / "jaxmm" / "assets" / "organism" / f, ckpt / f)
        for remat in ("0", "1"):
            cmd = [
                sys.executable,
                __file__,
                "--batch",
                str(args.batch),
                "--repeat",
                str(args.repeat),
                "--worker",
                str(ckpt),
                remat,
            ]
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
