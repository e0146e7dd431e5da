"""Named prompts of the methods' released evaluation and training code, for the eval harness
(``benchmarks: [{name: mmstar, prompt: vrga}]``) and GRPO (``system_prompt: sayo``).

A :class:`Prompt` is a user-turn template with one ``{question}`` placeholder (the question text
without the benchmark's standard instruction; the image goes before it) and an optional system turn.

* ``vrga`` — Ivine11/VRGA ``eval/eval_qwen.py:233-243`` (``mode="ori"``, the one its ``evaluate``
  runs): the question, a newline, then the answer-tag instruction. The image is given with
  ``max_pixels`` = 1024·28·28·2 (:242; a run setting: :data:`VRGA_MAX_PIXELS`).
* ``vrga_think`` — the same file, ``mode="think"`` (:235, used with ``with_cot``, off in :400).
* ``sayo`` — Cratileo/Sayo ``train/main.py:66-74``: the system turn of every training prompt (its
  pieces joined without separators, as there); the user turn is the question with the image first
  (TRL's ``prepare_multimodal_messages``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A user-turn template (one ``{question}``) and an optional system turn."""

    user: str = "{question}"
    system: str | None = None

    def messages(self, image, question: str) -> list[dict]:
        """The chat (HF message dicts) of one sample: the system turn if any, then the user turn with
        the image first and the formatted question."""
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return system + [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": self.user.format(question=question)}],
            }
        ]


PROMPTS: dict[str, Prompt] = {
    "vrga": Prompt("{question}\nThe final answer MUST BE in <answer> </answer> tags."),
    "vrga_think": Prompt("{question}\nLet's think step by step."),
    "sayo": Prompt(
        system=(
            "A conversation between a user and an assistant. The user asks a question, and the assistant must answer it."
            "The assistant first conducts internal reasoning, followed immediately by the final answer enclosed within "
            "<answer>...</answer> tags."
            "Requirements:"
            "1. The reasoning outside <answer></answer> should be concise, minimal, and essential.\n"
            "2. The final answer must be correct, complete, and directly address the user\u2019s question.\n"
            "3. When reasoning, focus on the areas of aim object in the image.\n"
            "4. You MUST HAVE thinking process before the final answer.\n"
        )
    ),
}

VRGA_MAX_PIXELS = 1024 * 28 * 28 * 2


def get(name: str) -> Prompt:
    """The prompt called ``name``.

    Raises:
        ValueError: an unknown name (the known ones are listed).
    """
    if name not in PROMPTS:
        raise ValueError(f"prompt {name!r}: unknown; known: {sorted(PROMPTS)}")
    return PROMPTS[name]
