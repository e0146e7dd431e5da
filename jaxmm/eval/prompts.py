"""Named prompt templates of the methods' released evaluation code: name -> template with one
``{question}`` placeholder (the user turn's text; the image goes before it).

* ``vrga`` — Ivine11/VRGA ``eval/eval_qwen.py:233-243`` (``mode="ori"``, the one its ``evaluate``
  runs): the question, a newline, then the answer-tag instruction. The image is given with
  ``max_pixels`` = 1024·28·28·2 (:242; a run setting: :data:`VRGA_MAX_PIXELS`).
* ``vrga_think`` — the same file, ``mode="think"`` (:235, used with ``with_cot``, off in :400).
"""

PROMPTS: dict[str, str] = {
    "vrga": "{question}\nThe final answer MUST BE in <answer> </answer> tags.",
    "vrga_think": "{question}\nLet's think step by step.",
}

VRGA_MAX_PIXELS = 1024 * 28 * 28 * 2
