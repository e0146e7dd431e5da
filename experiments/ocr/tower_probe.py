"""The frozen-tower probe of ``run.py`` (mean-pooled merged tokens -> linear classifier over the 8
words, 1024 OCR training samples of seed 0, 200 held-out of seed 1) on the vision towers of given
checkpoints: did an SFT keep the word features its start had?

    python experiments/ocr/tower_probe.py [--style 224:0.4] DIR [DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--style", default="224:0.4")
    args = ap.parse_args(argv)

    import jaxmm
    from run import run_probe

    size, scale = int(args.style.split(":")[0]), float(args.style.split(":")[1])
    out = {}
    for d in args.dirs:
        model = jaxmm.load(d, dtype="float32")
        res, _ = run_probe(model, size, scale, 1, 1024, 200)  # one trained step: only the frozen reading counts
        out[d] = {"frozen": res["frozen"], "frozen_train": res["frozen_train"]}
        print(f"{d}: frozen-tower probe {100 * res['frozen']:.1f} % held-out ({100 * res['frozen_train']:.1f} % train)")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
