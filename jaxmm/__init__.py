"""jaxmm: multimodal LLMs in JAX with an attention seam for research on visual attention."""
