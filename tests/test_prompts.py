"""The released prompt templates format a question into the released user text."""

import pytest

from jaxmm.eval.prompts import PROMPTS, VRGA_MAX_PIXELS


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_each_template_formats_a_question(name):
    text = PROMPTS[name].format(question="Is there a {cat}?")
    assert text.startswith("Is there a {cat}?\n") and "{question}" not in text
    assert PROMPTS[name].count("{question}") == 1


def test_vrga_prompt_is_the_released_text():
    # eval/eval_qwen.py:234,243: f"{question}\n{instruct}"
    assert PROMPTS["vrga"].format(question="Q") == "Q\nThe final answer MUST BE in <answer> </answer> tags."
    assert PROMPTS["vrga_think"].format(question="Q") == "Q\nLet's think step by step."
    assert VRGA_MAX_PIXELS == 1605632
