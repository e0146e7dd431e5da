"""EasyDeL side of the jaxmm / transformers / EasyDeL benchmark: one Hugging Face Qwen2-VL checkpoint, float32.

    /tmp/venv-easydel/bin/python experiments/bench/easydel_runner.py --checkpoint DIR --inputs INPUTS.npz \
        --new N --repeats R --out RESULT.json

Runs in EasyDeL's own virtual environment (EasyDeL 0.3.0, jax 0.9.x), imports neither jaxmm nor torch.
INPUTS.npz holds input_ids [B,S], attention_mask [B,S], pixel_values [N, C*T*P*P] and image_grid_thw
[n_images,3], as transformers' Qwen2VLImageProcessor produces them; DIR is what transformers'
save_pretrained wrote (config.json + *.safetensors, float32; bf16 files are not read by safetensors.numpy).

Loading. EasyDeL's own loader for Hugging Face checkpoints (``AutoEasyDeLModelFor*.from_pretrained`` ->
``_from_torch_pretrained``) needs torch (it loads the transformers model or reads safetensors with
``safetensors.torch``). Here the same steps are done without torch: EasyDeL's ``Qwen2VLConfig.from_pretrained``
reads config.json, ``Qwen2VLForConditionalGeneration.lazy_init`` builds the module, the safetensors file is read
with numpy, the checkpoint's key layout is renamed to the module's (what transformers' own loading does:
``visual.*`` -> ``model.visual.*``, ``model.{embed_tokens,layers,norm}`` -> ``model.language_model.*``), and
EasyDeL's own converter (``model.pure_transform_fn`` = ``StateDictConverter.huggingface_to_easydel``:
transposes, renames) and ``merge_model_and_tree`` attach the weights.

Settings needed to reproduce transformers' float32 numerics (EasyDeL 0.3.0 defaults differ; each is recorded
in RESULT.json["settings"]):
  * dtype = param_dtype = float32, precision HIGHEST; attn_dtype, kvdtype (KV cache) and attn_softmax_dtype
    float32 (defaults: attn_dtype and kvdtype bfloat16); attn_mechanism "vanilla" (plain XLA attention, runs on
    CPU), decode_attn_mechanism "vanilla".
  * rope_theta from config.json's text_config.rope_parameters (EasyDeL's Qwen2VLTextConfig only reads a top-level
    ``rope_theta`` and otherwise defaults to 1e6, while transformers >= 5 writes it in ``rope_parameters``).
  * M-RoPE layout: rope_scaling["repetition_style"] = True, transformers' split by ``mrope_section * 2``
    (EasyDeL's default chunked layout gives T the first 2*t rotary dims instead of t in each half).
  * float32 rope table: ``EasyDeLBaseConfig.get_basic_frequencies`` casts the cos/sin table to bfloat16; it is
    replaced by the same computation without the cast.
  * text attention biases: EasyDeL's Qwen2-VL text attention takes its q/k/v bias flag from
    ``config.attention_bias``, which Qwen2VLTextConfig never sets (so Qwen2-VL's q/k/v biases are dropped);
    attention_bias = True is set and the o_proj bias (absent in Qwen2-VL) is loaded as zeros.
  * vision heads: Qwen2VLVisionBlock builds its attention without ``num_heads`` (so always 16 heads);
    Qwen2VLVisionAttention is made to take ``vision_config.num_heads``.
Not numerics but needed to run: more than one image does not trace under jit (the vision attention's per-image
``jnp.split`` at cu_seqlens computed with jnp), so the vision tower/attention get the same code with cu_seqlens in
numpy; the top-level Qwen2VLConfig gets ``vocab_size`` from text_config; ``easydel.modules`` fails to import without
torch (six import-time patches of transformers' torch models), so those modules are stubbed when torch is absent.

Each one left at EasyDeL's default (``--keep-default NAME``), on easydel_check.py's checkpoint (B=1, 24 greedy
tokens; max |last logits error| against transformers eager, tokens equal): all set 1.8e-5, 24/24;
rope_table (bf16) 4.6e-2, 24/24; attn_dtype (bf16 attention and KV cache) 0.11, 11/24; attention_bias 2.6, 1/24;
mrope_layout 3.2, 0/24; rope_theta 8.2, 0/24; vision_heads does not trace (cos/sin of head_dim 32 against 16
heads of 8).

Generation path. ``model.generate`` (EasyDeL's EasyGenerationMixin: HF-style API, greedy search = one prefill
step then a ``lax.while_loop`` of single-token steps over a dense TransformerCache KV cache), traced under one
``jax.jit`` per (N, shapes), the way EasyDeL's trainers call it (``ejit`` around ``module.generate``). It is the
single-process, single-request path; eSurge (EasyDeL's serving engine, continuous batching over a paged KV
cache, background scheduler, text prompts through a tokenizer/processor) is built for serving many requests
and is not used here. Images are handled in generation: pixel_values
and image_grid_thw go to ``generate``; the 3-D M-RoPE position ids are computed on the host with EasyDeL's
``get_rope_index`` (numpy; not traceable) and passed in, as EasyDeL's own ``prepare_inputs_for_call`` does.
No early stop (eos disabled). Decode rate = B*(N-1) / (t(N new tokens) - t(1 new token)), each the best of R
after a warm-up call; generate would size the KV cache from max_new_tokens (S+N in one, S+1 in the other), so
the runner passes one preallocated cache (``model.init_cache``, S+N rounded up to 64) to both, as jaxmm's decode.py
does. jax's persistent compilation cache is off (see ``--persistent-cache``) so compile_s is a real first compile.
Prefill = host get_rope_index + one jitted forward over the prompt (vision tower included) producing logits.
compile_s = first call minus best call of the N-token generate (trace + XLA compile); RESULT.json["timings"] also
has the prefill's and the 1-token generate's first calls.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import sys
import time
import types


def _no_torch_shims():
    """EasyDeL 0.3.0's ``easydel.modules`` imports patch six transformers torch modules at import time and fail
    without torch (transformers' placeholder raises ImportError on getattr). Those patches only concern the
    torch models; give EasyDeL empty modules in their place."""
    try:
        import torch  # noqa: F401

        return
    except ModuleNotFoundError:
        pass
    for fam in ("dbrx", "llama4", "qwen3_next", "qwen3_5_moe", "phimoe", "glm4v_moe"):
        try:
            pkg = importlib.import_module(f"transformers.models.{fam}")
        except ModuleNotFoundError:
            continue
        stub = types.ModuleType(f"transformers.models.{fam}.modeling_{fam}")
        sys.modules[stub.__name__] = stub
        setattr(pkg, f"modeling_{fam}", stub)


class _NP:
    """The few torch.Tensor methods EasyDeL's StateDictConverter calls, over a numpy array."""

    def __init__(self, a):
        self.a = a

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)

    def permute(self, *axes):
        return _NP(self.a.transpose(axes))

    def float(self):
        return _NP(self.a.astype("float32"))

    def cpu(self):
        return self

    def detach(self):
        return self

    def numpy(self):
        return self.a


def _rename(key: str) -> str:
    """transformers' Qwen2-VL checkpoint layout -> the module layout (transformers' own key mapping)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model.") :]
    return key


ABLATIONS = ("rope_table", "vision_heads", "rope_theta", "mrope_layout", "attention_bias", "attn_dtype")


def load(checkpoint: str, keep_default: tuple[str, ...] = (), attn: str = "vanilla"):
    """EasyDeL Qwen2-VL module with the checkpoint's weights and transformers' float32 numerics.

    ``keep_default``: names from ABLATIONS whose EasyDeL default is left in place (to see what each costs)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import load_file

    from easydel.infra.base_config import EasyDeLBaseConfig
    from easydel.infra.utils import ModuleCaches
    from easydel.layers import get_frequencies
    from easydel.modules.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from easydel.modules.qwen2_vl import modeling_qwen2_vl as mq
    from easydel.utils.traversals import merge_model_and_tree

    settings = {}

    # float32 rope table (EasyDeL casts it to bfloat16)
    def get_basic_frequencies(self, head_size=None, rotary_dim=None, base=None):
        from jax.sharding import NamedSharding, PartitionSpec

        head_size = head_size or self.head_dim
        freqs = get_frequencies(
            head_size=head_size,
            rotary_dim=rotary_dim or head_size,
            max_position=self.granted_freq_max_position_embedding,
            base=base or self.rope_theta,
            rope_scaling=self._get_rope_config().to_dict(),
            partial_rotary_factor=getattr(self, "partial_rotary_factor", 1.0),
        )
        return ModuleCaches(jax.device_put(freqs.astype(jnp.float32), NamedSharding(self.mesh, PartitionSpec())))

    if "rope_table" not in keep_default:
        EasyDeLBaseConfig.get_basic_frequencies = get_basic_frequencies
    settings["rope_table_dtype"] = "bfloat16 (default)" if "rope_table" in keep_default else "float32"

    # vision attention heads from the config (Qwen2VLVisionBlock does not pass num_heads: always 16)
    init = mq.Qwen2VLVisionAttention.__init__

    def vision_attn_init(self, config, layer_idx, dim, num_heads=None, *a, **k):
        init(self, config, layer_idx, dim, config.num_heads if num_heads is None else num_heads, *a, **k)

    if "vision_heads" not in keep_default:
        mq.Qwen2VLVisionAttention.__init__ = vision_attn_init

    # several images under jit: Qwen2VLVisionAttention splits q/k/v per image with jnp.split at cu_seqlens, which
    # must be concrete; Qwen2VLVisionTransformer computes them with jnp (a tracer under jit, so more than one image
    # fails to trace). Same computation, cu_seqlens from the (static, numpy) image_grid_thw with numpy.
    def vision_call(self, hidden_states, grid_thw, max_grid_size):
        hidden_states = self.patch_embed(hidden_states)
        rotary_pos_emb = self.rot_pos_emb(grid_thw, max_grid_size)
        emb = jnp.concatenate([rotary_pos_emb, rotary_pos_emb], axis=-1)
        position_embeddings = (jnp.cos(emb), jnp.sin(emb))
        g = np.asarray(grid_thw)
        cu_seqlens = np.pad(np.cumsum(np.repeat(g[:, 1] * g[:, 2], g[:, 0]), dtype=np.int32), (1, 0))
        for block in self.blocks:
            hidden_states = block(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        return self.merger(hidden_states)

    def vision_attn_call(self, hidden_states, cu_seqlens, position_embeddings=None):
        seq_length = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).transpose(1, 0, 2, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = mq.apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (x.swapaxes(0, 1)[None, ...] for x in (q, k, v))
        cuts = [int(c) for c in np.asarray(cu_seqlens)[1:-1]]
        outs = []
        for qc, kc, vc in zip(*(jnp.split(x, cuts, axis=2) for x in (q, k, v)), strict=True):
            w = jnp.matmul(qc, kc.swapaxes(-1, -2)) / math.sqrt(self.head_dim)
            w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(qc.dtype)
            outs.append(jnp.matmul(w, vc).swapaxes(1, 2))
        return self.proj(jnp.concatenate(outs, axis=1).reshape(seq_length, -1))

    mq.Qwen2VLVisionTransformer.__call__ = vision_call
    mq.Qwen2VLVisionAttention.__call__ = vision_attn_call
    settings["vision_cu_seqlens"] = "numpy from image_grid_thw (several images under jit)"

    cfg = Qwen2VLConfig.from_pretrained(checkpoint)
    raw = json.load(open(os.path.join(checkpoint, "config.json")))
    tc, vc = cfg.text_config, cfg.vision_config
    settings["vision_num_heads"] = 16 if "vision_heads" in keep_default else vc.num_heads
    rp = raw["text_config"].get("rope_parameters") or raw["text_config"].get("rope_scaling") or {}
    theta = raw["text_config"].get("rope_theta", rp.get("rope_theta"))
    if theta is not None and "rope_theta" not in keep_default:
        tc.rope_theta = float(theta)
    settings["rope_theta"] = tc.rope_theta
    if "mrope_layout" not in keep_default:
        tc.rope_scaling = dict(tc.rope_scaling or {}, repetition_style=True, mrope_interleaved=False)
    settings["rope_scaling"] = tc.rope_scaling
    tc.attention_bias = "attention_bias" not in keep_default
    if getattr(cfg, "vocab_size", None) is None:
        cfg.vocab_size = tc.vocab_size
    settings["text_attention_bias"] = (
        "none (default: checkpoint q/k/v biases dropped)"
        if "attention_bias" in keep_default
        else "q/k/v from checkpoint, o_proj zeros"
    )
    basic = dict(
        attn_mechanism=attn,
        decode_attn_mechanism=attn,
        attn_dtype=jnp.float32,
        kvdtype=jnp.float32,
        attn_softmax_dtype=jnp.float32,
    )
    if "attn_dtype" in keep_default:
        del basic["attn_dtype"], basic["kvdtype"]
    for c in (cfg, tc, vc):
        c.add_basic_configurations(**basic)
    settings.update({k: str(getattr(v, "__name__", v)) for k, v in basic.items()})
    settings.update(dtype="float32", param_dtype="float32", precision="HIGHEST")

    model = Qwen2VLForConditionalGeneration.lazy_init(
        config=cfg, dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0)
    )
    shards = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {checkpoint}")
    sd = {_rename(k): v for f in shards for k, v in load_file(os.path.join(checkpoint, f)).items()}
    for i in range(tc.num_hidden_layers if tc.attention_bias else 0):
        sd.setdefault(f"model.language_model.layers.{i}.self_attn.o_proj.bias", np.zeros(tc.hidden_size, np.float32))
    params = model.pure_transform_fn({k: _NP(v) for k, v in sd.items()}, verbose=False)
    model = merge_model_and_tree(model=model, tree=params)
    return model, cfg, settings


def best_of(fn, repeats):
    """(first-call seconds, best of ``repeats`` seconds after it)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--attn",
        default="vanilla",
        choices=("vanilla", "sdpa"),
        help="EasyDeL attn_mechanism (text decoder; the vision tower has its own plain attention)",
    )
    ap.add_argument(
        "--persistent-cache",
        action="store_true",
        help="leave jax's persistent compilation cache on (EasyDeL turns it on at import)",
    )
    ap.add_argument("--keep-default", default="", help=f"comma list from {ABLATIONS}: leave EasyDeL's default")
    args = ap.parse_args(argv)
    if args.new < 2:
        ap.error("--new must be >= 2 (the decode rate is a difference of N and 1 new tokens)")

    import jax

    # EasyDeL's ejit (applied at import) points jax's persistent compilation cache at ~/.cache/ejkernel-cache for the
    # whole process: a second run would load the executables and report a smaller compile time. Keep it off.
    if not args.persistent_cache:
        jax.config.update("jax_enable_compilation_cache", False)
    _no_torch_shims()
    import easydel
    import numpy as np
    from flax import nnx
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    keep = tuple(x for x in args.keep_default.split(",") if x)
    if set(keep) - set(ABLATIONS):
        ap.error(f"--keep-default: unknown {sorted(set(keep) - set(ABLATIONS))}; choose from {ABLATIONS}")
    model, cfg, settings = load(args.checkpoint, keep, args.attn)
    load_s = time.perf_counter() - t0
    b = dict(np.load(args.inputs))
    ids, mask = b["input_ids"].astype(np.int32), b["attention_mask"].astype(bool)
    pixels, grid = b["pixel_values"].astype(np.float32), np.asarray(b["image_grid_thw"], np.int64)
    batch, seq = ids.shape
    graphdef, graphstate, graphother = model.split_module()

    def rope_index():
        # host numpy (EasyDeL's get_rope_index is not traceable): [3,B,S] M-RoPE positions
        return model.base_model.get_rope_index(input_ids=ids, image_grid_thw=grid, attention_mask=mask)[0]

    @jax.jit
    def forward(gs, input_ids, attention_mask, pixel_values, position_ids):
        m = nnx.merge(graphdef, gs, graphother)
        out = m(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            position_ids=position_ids,
        )
        return out.logits

    def prefill():
        with model.mesh:
            return jax.block_until_ready(forward(graphstate, ids, mask, pixels, rope_index()))

    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0, bos_token_id=None)
    model.generation_config = gen_cfg
    gens = {}

    cache_len = 64 * -(-(seq + args.new) // 64)  # one KV cache size for the 1-token and the N-token runs

    def make_generate(n):
        @jax.jit
        def gen(gs, input_ids, attention_mask, pixel_values, position_ids):
            m = nnx.merge(graphdef, gs, graphother)
            m.generation_config = gen_cfg
            cache = m.init_cache(batch, cache_len, None, None, gen_cfg.pad_token_id)
            out = m.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                image_grid_thw=grid,
                position_ids=position_ids,
                past_key_values=cache,
                generation_config=gen_cfg,
                max_new_tokens=n,
            )
            return out.sequences[:, seq:]

        return gen

    def generate(n):
        if n not in gens:
            gens[n] = make_generate(n)
        with model.mesh:
            return np.asarray(jax.block_until_ready(gens[n](graphstate, ids, mask, pixels, rope_index())))

    prefill_first, prefill_s = best_of(prefill, args.repeats)
    rope_s = best_of(rope_index, args.repeats)[1]
    logits = np.asarray(prefill())
    one_first, t1 = best_of(lambda: generate(1), args.repeats)
    n_first, tn = best_of(lambda: generate(args.new), args.repeats)
    tokens = generate(args.new)
    res = dict(
        prefill_s=prefill_s,
        compile_s=n_first - tn,
        # None when t(N) <= t(1): noise larger than the decode time (raise --new / --repeats)
        decode_tok_s=batch * (args.new - 1) / (tn - t1) if tn > t1 else None,
        tokens=tokens.tolist(),
        prefill_logits_last=logits[0, -1].astype(float).tolist(),
        easydel_version=easydel.__version__,
        jax_version=jax.__version__,
        version=f"EasyDeL {easydel.__version__} vanilla attention, jax {jax.__version__}",
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        settings=dict(
            settings,
            generation="model.generate (EasyGenerationMixin greedy) under jax.jit",
            eos="disabled (no early stop)",
            kv_cache=f"TransformerCache [{batch}, {cache_len}] float32",
            persistent_compilation_cache=bool(args.persistent_cache),
            backend=jax.devices()[0].platform,
        ),
        timings=dict(
            load_s=load_s,
            rope_index_host_s=rope_s,
            prefill_first_call_s=prefill_first,
            prefill_compile_s=prefill_first - prefill_s,
            generate_1_s=t1,
            generate_1_first_call_s=one_first,
            generate_n_s=tn,
            generate_n_first_call_s=n_first,
            batch=batch,
            prompt_len=seq,
            new=args.new,
            repeats=args.repeats,
        ),
    )
    with open(args.out, "w") as f:
        json.dump(res, f)
    print(
        f"easydel {easydel.__version__} jax {jax.__version__}: prefill {prefill_s * 1e3:.1f} ms, "
        f"decode {res['decode_tok_s'] or float('nan'):.1f} tok/s, compile {res['compile_s']:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
