"""A tiny Qwen-style tokenizer and chat template, built locally (no hub), saved beside test weights.

Special-token ids match tests/tiny.py: <|endoftext|> 0 (pad), <|im_end|> 1 (eos), <|im_start|> 2,
<|image_pad|> 290, <|video_pad|> 291, <|vision_start|> 292, <|vision_end|> 293; ordinary BPE tokens
use ids 3..289.
"""

from __future__ import annotations

from jaxmm.organism import CORPUS, TEMPLATE, build_tokenizer  # noqa: F401
