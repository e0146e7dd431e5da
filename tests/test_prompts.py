"""The released prompts: each formats a question into the released user text (and system turn)."""

import pytest

from jaxmm.prompts import PROMPTS, VRGA_MAX_PIXELS, Prompt, get


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_each_prompt_formats_a_question(name):
    p = PROMPTS[name]
    assert p.user.count("{question}") == 1
    msgs = p.messages("IMG", "Is there a {cat}?")
    user = msgs[-1]
    assert user["role"] == "user" and user["content"][0] == {"type": "image", "image": "IMG"}
    assert user["content"][1]["text"].startswith("Is there a {cat}?")
    assert [m["role"] for m in msgs] == (["system", "user"] if p.system else ["user"])


def test_the_released_texts():
    # VRGA eval/eval_qwen.py:234,243: f"{question}\n{instruct}"
    assert PROMPTS["vrga"].user.format(question="Q") == "Q\nThe final answer MUST BE in <answer> </answer> tags."
    assert PROMPTS["vrga_think"].user.format(question="Q") == "Q\nLet's think step by step."
    assert VRGA_MAX_PIXELS == 1605632
    # Sayo train/main.py:66-74: pieces joined without separators; the user turn is the bare question
    sayo = PROMPTS["sayo"]
    assert sayo.user == "{question}" and sayo.system.startswith("A conversation between a user and an assistant.")
    assert "answer it.The assistant" in sayo.system and "tags.Requirements:1. The" in sayo.system
    assert sayo.system.endswith("4. You MUST HAVE thinking process before the final answer.\n")
    assert get("vrga") is PROMPTS["vrga"] and Prompt().messages(None, "x")[0]["content"][1]["text"] == "x"
    with pytest.raises(ValueError, match=r"prompt 'vgra': unknown; known: \['sayo', 'vrga', 'vrga_think'\]"):
        get("vgra")
