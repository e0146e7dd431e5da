"""Attention-based losses and rewards (AVAR, SAYO) and the GRPO objective, as pure jnp functions
of probe outputs, logits and masks (one method per file)."""
