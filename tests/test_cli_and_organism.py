"""The embedded organism (a real HF checkpoint directory) and the command line."""

import numpy as np
import pytest
import torch

import jaxmm
import tiny
from jaxmm import cli, organism


def test_organism_is_a_checkpoint_transformers_reads_identically(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = organism.build(tmp_path / "org")
    assert organism.build(tmp_path / "org") == path  # second call reuses it
    ref_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ref_model.config._attn_implementation = "eager"
    model = jaxmm.load(path)
    photo = tiny.photos()["coffee"]
    pix = model.image_processor([photo])
    n = int(pix["image_grid_thw"][0].prod()) // 4
    ids = np.array([[5, 6, 292] + [290] * n + [293, 7, 8, 9]])
    t = dict(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.ones(ids.shape, dtype=torch.long),
        pixel_values=torch.from_numpy(pix["pixel_values"]),
        image_grid_thw=torch.from_numpy(pix["image_grid_thw"]),
        mm_token_type_ids=torch.from_numpy(tiny.mm_token_type_ids(ids)),
    )
    with torch.no_grad():
        ref = ref_model(**t).logits.numpy()
    out = np.asarray(model.forward(input_ids=ids, pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"]).logits)
    assert np.abs(out - ref).max() < 1e-4


def test_demo_and_generate_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXMM_HOME", str(tmp_path))
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "organism" in out and "image tokens" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == organism.CONFIG["text_config"]["num_hidden_layers"]
    masses = [float(r[1]) for r in rows]
    assert all(0.0 < m <= 1.0 for m in masses)

    from PIL import Image

    img = tmp_path / "coffee.png"
    tiny.photos()["coffee"].save(img)
    args = ["generate", "--image", str(img), "--prompt", "what is in the cup ?", "--max-new-tokens", "8"]
    assert cli.main(args) == 0
    plain = capsys.readouterr().out
    assert cli.main(args + ["--stream"]) == 0
    streamed = capsys.readouterr().out
    assert plain == streamed and len(plain.strip()) > 0
    assert isinstance(Image.open(img), Image.Image)


def test_inspect_renders_a_heatmap(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("JAXMM_HOME", str(tmp_path))
    img = tmp_path / "cat.png"
    tiny.photos()["chelsea"].save(img)
    out = tmp_path / "heat.png"
    assert (
        cli.main(
            [
                "inspect",
                "--image",
                str(img),
                "--prompt",
                "what animal is it ?",
                "--method",
                "vrga",
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "answer:" in text and str(out) in text
    assert Image.open(out).size[0] > 200


def test_bad_input_ends_in_one_line_without_traceback(tmp_path, capsys):
    from jaxmm.cli import main

    assert main(["eval", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxmm eval: error:") and "missing.yaml" in err and "\n" not in err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("batchsize: 2\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown field(s) ['batchsize']" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="batchsize"):
        main(["--debug", "eval", "--config", str(cfg)])
