"""
A Qwen2 decoder-only transformer written from scratch, its KV cache, and a batched sampler.

Run nothing here directly: train.py, grpo.py and eval.py import it, hf_io.py loads and saves it, bench.py times it.

Architecture (identical to Hugging Face's Qwen2ForCausalLM, so Qwen2.5 checkpoints load by a prefix strip):
  - token embedding -> n_layers pre-norm blocks -> final RMSNorm -> lm_head (tied to the embedding or not)
  - block: x + Attention(RMSNorm(x)), then x + MLP(RMSNorm(x))
  - RMSNorm computed in float32, cast back to the input dtype, THEN multiplied by its weight (HF's order)
  - rotary position embedding (RoPE), "split-halves" flavour (rotate_half), inverse frequencies in float32
  - grouped-query attention (GQA): n_heads query heads share n_kv_heads key/value heads; q/k/v have a bias,
    the output projection has none; attention runs through F.scaled_dot_product_attention
  - SwiGLU MLP: down(silu(gate(x)) * up(x)), no biases
Choices:
  - padding: attention_mask [B,T] (1 = real token) may pad on the left and/or the right. RoPE positions are
    counted over real tokens only (cumsum of the mask), so a padded row sees exactly the positions of its
    unpadded self. Every query may always see its own key, so rows of pure padding give finite junk, never NaN.
  - generate(): prefills each distinct prompt once, then decodes its num_samples rows with all others in one batch.
  - sampling: temperature, then top-p, then one uniform per row and step from an explicit generator. The fast
    sample_next_token (exact inverse CDF) follows the plain sample_next_token_reference and is tested against it.
Checked against transformers' Qwen2ForCausalLM (tests/test_loader.py): identical fp32 and bf16 logits and greedy output.
Shape letters: B batch, T time, H query heads, H_kv key/value heads, D head dim, C model dim, V vocab.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 259        # embedding rows (may exceed the ids a tokenizer emits, e.g. Qwen's padding rows)
    dim: int = 256               # model width C (HF hidden_size)
    n_layers: int = 4            # number of transformer blocks
    n_heads: int = 4             # query heads H
    n_kv_heads: int = 2          # key/value heads H_kv (GQA: each serves n_heads // n_kv_heads query heads)
    ffn_dim: int = 688           # SwiGLU hidden width (HF intermediate_size)
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-6       # RMSNorm epsilon
    qkv_bias: bool = True        # bias on q/k/v projections (always true in Qwen2)
    tie_embeddings: bool = True  # lm_head shares the embedding matrix
    max_seq_len: int = 512       # longest prompt + completion we allow (HF max_position_embeddings)

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim; got "
                             f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; ValueError naming the key if we cannot run it exactly."""
        def refuse(key, why):
            raise ValueError(f"unsupported config.json: {key}={hf.get(key)!r} ({why}); this model.py implements "
                             f"plain Qwen2 (model_type 'qwen2', silu, full attention, unscaled RoPE) only")
        if hf.get("model_type") != "qwen2":
            refuse("model_type", "expected 'qwen2'")
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "the MLP is SwiGLU with silu")
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            refuse("layer_types", "only full attention is implemented")
        for key, what in [("use_sliding_window", "sliding-window attention"), ("use_mrope", "multimodal RoPE"),
                          ("rope_scaling", "RoPE scaling (YaRN, dynamic NTK, ...)"), ("attention_dropout",
                          "attention dropout"), ("quantization_config", "quantized checkpoints")]:
            if hf.get(key):
                refuse(key, f"{what} is not implemented")
        theta = hf.get("rope_theta")
        rope = hf.get("rope_parameters")  # transformers >= 5 writes {"rope_type": "default", "rope_theta": ...}
        if rope:
            if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
                refuse("rope_parameters", "only default (unscaled) RoPE is implemented")
            theta = rope.get("rope_theta", theta)
        try:
            config = cls(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                         n_heads=hf["num_attention_heads"],
                         n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                         ffn_dim=hf["intermediate_size"], rope_theta=float(theta or 10000.0),
                         norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=True,
                         tie_embeddings=hf.get("tie_word_embeddings", False),  # HF's Qwen2 default is untied
                         max_seq_len=hf.get("max_position_embeddings", 32768))
        except KeyError as e:
            raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
        if hf.get("head_dim", config.head_dim) != config.head_dim:
            refuse("head_dim", "must equal hidden_size // num_attention_heads")
        return config

    def to_hf(self) -> dict:
        """A Qwen2ForCausalLM config.json dict (the dtype is added by save_hf, which knows the weights)."""
        if not self.qkv_bias:
            raise ValueError("Qwen2 always has q/k/v biases; a qkv_bias=False model cannot be saved as Qwen2")
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": self.vocab_size,
                "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                "num_key_value_heads": self.n_kv_heads, "intermediate_size": self.ffn_dim, "hidden_act": "silu",
                "rope_theta": self.rope_theta, "rms_norm_eps": self.norm_eps,
                "tie_word_embeddings": self.tie_embeddings, "max_position_embeddings": self.max_seq_len,
                "use_sliding_window": False, "sliding_window": None, "attention_dropout": 0.0, "use_cache": True}


def _qwen25(dim, n_layers, n_heads, ffn_dim):
    # shared by all Qwen2.5 sizes: vocab 151936 rows, theta 1e6, eps 1e-6, 2 kv heads, tied, 32k context
    return ModelConfig(vocab_size=151936, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=2,
                       ffn_dim=ffn_dim, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True, max_seq_len=32768)


PRESETS = {
    # trained from scratch over the byte vocabulary (train.py --init=scratch narrows it with --dim/--n_layers)
    "small": ModelConfig(vocab_size=259, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688,
                         rope_theta=10000.0, norm_eps=1e-6, max_seq_len=512),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 4864), "qwen2.5-1.5b": _qwen25(1536, 28, 12, 8960),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 11008),   # 3,085,938,688 parameters
}

# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * w. Normalise in float32 for accuracy,
        # cast back, then scale: HF's order, which matters for bit-exact bf16 agreement.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions, config, dtype):
    # RoPE (Su et al. 2021, RoFormer): pair i of each head rotates by angle pos * theta^(-2i/D).
    # positions (B, T) long -> cos, sin (B, 1, T, D). Computed in float32 (then cast, like HF) and afresh each
    # call from the config: a few tiny kernels, and no buffer that model.to(bfloat16) could silently round.
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=positions.device).float() / D))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)       # (B, T, D): split-halves layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    # RoPE, split-halves form: x*cos + rotate_half(x)*sin with rotate_half([x1, x2]) = [-x2, x1]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def grouped_query_attention(q, k, v, attn_mask, is_causal, fold=False):
    """GQA (Ainslie et al. 2023): q (B, H, T, D), k and v (B, H_kv, T_k, D); each group of G = H // H_kv query
    heads (consecutive, as in HF) reads one kv head. -> (B, H, T, D).
    Plain: SDPA's enable_gqa maps the groups, no copies. On CUDA its flash kernel takes no mask and its
    memory-efficient kernel no enable_gqa, so a mask plus enable_gqa falls to the math kernel (all B x H x T x T_k
    scores written, the cache copied G times). fold=True (with a mask) instead folds each group's G query heads
    into the query axis, (B, H_kv, G * T, D) against the kv heads as they are, with the mask repeated G times:
    the same products, no GQA for SDPA to map, so the memory-efficient kernel takes it."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    if G == 1 or attn_mask is None or not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=G > 1)
    q = q.reshape(B, k.shape[1], G * T, D)                                  # group g's heads, then their T queries
    mask = attn_mask[:, :, None].expand(-1, -1, G, -1, -1).reshape(B, 1, G * T, -1)  # (B, 1, G*T, T_k)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)              # (B, H_kv, G*T, D)
    return y.reshape(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        C, D = config.dim, config.head_dim
        self.q_proj = nn.Linear(C, config.n_heads * D, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, config.n_kv_heads * D, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, config.n_kv_heads * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * D, C, bias=False)

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # write this step's keys/values, attend over everything cached so far
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H_kv, T_cached + T, D)
        y = grouped_query_attention(q, k, v, attn_mask, is_causal, fold=q.is_cuda)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        # SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, is_causal, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, kv_cache)  # pre-norm
        return x + self.mlp(self.post_attention_layernorm(x))

# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys/values for every layer, (B, H_kv, T_max, D) each: the kv heads only, never the expanded
    query heads (8x smaller for Qwen2.5-3B). Owns all position state: `length` filled columns (the same for all
    rows, since prompts are left-padded to a common length), `next_pos` (B,) the RoPE position of each row's
    next real token, and `key_mask` (B, T_max) which cached columns are real tokens rather than padding."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.key_mask = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.next_pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0       # python int: no device sync to read it
        self.padded = False   # True once any padding was written (then attention needs an explicit mask)

    def record_keys(self, mask, T):
        if self.length + T > self.key_mask.shape[1]:
            raise ValueError(f"KVCache full: {self.length} + {T} tokens > max_len {self.key_mask.shape[1]}")
        if mask is not None:
            self.key_mask[:, self.length:self.length + T] = mask
            self.padded = True

    def update(self, layer_idx, k, v):
        # write the new (B, H_kv, T, D) keys/values at the current column, return views of the filled part
        end = self.length + k.shape[2]
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, mask, T):
        self.next_pos += T if mask is None else mask.sum(-1)
        self.length += T

    def select(self, rows):
        """Keep (and repeat/reorder) batch rows in place: rows (B',) long. Copies only the filled columns."""
        L = self.length
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):
                new = old.new_zeros((len(rows),) + old.shape[1:])
                new[:, :, :L] = old[rows, :, :L]
                cache[i] = new
        self.key_mask, self.next_pos = self.key_mask[rows], self.next_pos[rows]

# -----------------------------------------------------------------------------
# The model


def make_attention_mask(mask, kv_cache, T, device):
    """What each of the T new queries may attend to, built once for all layers -> (attn_mask, is_causal) for SDPA.
    mask (B, T) bool or None (True = real token); call after kv_cache.record_keys. Three cases:
      - no padding and no cached prefix: no mask, is_causal (SDPA's built-in causal mask, the fastest kernels)
      - padding (new or cached), or several new tokens after a cached prefix: an explicit (B, 1, T, T_k) boolean
        mask, True = may attend: causal & real keys, | its own key (so a row of pure padding never gives NaN)
      - one new token on an unpadded cache (plain decoding): no mask at all, it sees every cached key"""
    start = 0 if kv_cache is None else kv_cache.length  # absolute column of the first new token
    padded = mask is not None or (kv_cache is not None and kv_cache.padded)
    if not padded and start == 0:
        return None, T > 1
    if not padded and T == 1:
        return None, False
    q_cols = torch.arange(start, start + T, device=device)[:, None]   # (T, 1) absolute columns
    k_cols = torch.arange(start + T, device=device)[None, :]          # (1, T_k)
    key_mask = mask if kv_cache is None else kv_cache.key_mask[:, :start + T]  # (B, T_k)
    attn_mask = (k_cols <= q_cols)[None] & key_mask[:, None, :]       # (B, T, T_k) causal & real keys
    return (attn_mask | (k_cols == q_cols)[None])[:, None], False     # (B, 1, T, T_k)


def compute_dtype(model):
    """The dtype a Linear layer's output has: autocast's (bf16 under bf16-mixed) when it is on, else the weights'.
    RoPE's cos/sin and the KV cache use it, so q, k and the cache are not silently kept in float32."""
    device_type = model.embed_tokens.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.embed_tokens.weight.dtype


class Transformer(nn.Module):
    """Qwen2ForCausalLM without the "model." prefix: parameter names match a HF checkpoint's after the strip."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: less memory, ~1/3 more compute
        self.compile_blocks = False  # forwards without a KV cache (training, scoring) run compiled_block
        # ids < vocab_limit are real tokens; generate and the log-probs never look past them. Qwen pads its
        # embedding past the vocabulary (151,936 rows, 151,665 ids): load_qwen sets the tokenizer's count here.
        self.vocab_limit = config.vocab_size
        self.reset_parameters()

    def reset_parameters(self):
        """Fresh weights: normal std 0.02 (HF's initializer_range), zero biases, unit norms; lm_head tied if asked."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.is_meta:  # built for loading: no memory to fill yet
            return
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def hidden_states(self, tokens, kv_cache=None, attention_mask=None):
        """tokens (B, T) -> final-normed hidden states (B, T, C). attention_mask (B, T): 1/True = real token."""
        B, T = tokens.shape
        device = tokens.device
        mask = None if attention_mask is None else attention_mask.to(device=device, dtype=torch.bool)
        # RoPE positions count real tokens only, so a padded row gets exactly the cos/sin of its unpadded self
        # (scores depend only on relative position, so plain column indices would agree only up to rounding)
        if mask is None:
            positions = torch.arange(T, device=device).expand(B, T)                # (B, T)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)                  # (B, T)
        if kv_cache is not None:
            positions = positions + kv_cache.next_pos[:, None]
            kv_cache.record_keys(mask, T)  # mark which of the new keys are real
        attn_mask, is_causal = make_attention_mask(mask, kv_cache, T, device)
        cos, sin = rope_cos_sin(positions, self.config, compute_dtype(self))  # q and k stay bf16 under autocast
        x = self.embed_tokens(tokens)                                         # (B, T, C)
        block = compiled_block() if self.compile_blocks and kv_cache is None else Block.__call__
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None:
                x = checkpoint(block, layer, x, cos, sin, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(layer, x, cos, sin, attn_mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(mask, T)  # the one place the cache's positions move forward
        return self.norm(x)

    def forward(self, tokens, kv_cache=None, attention_mask=None):
        """tokens (B, T) -> logits (B, T, V) in the weights' dtype."""
        return self.lm_head(self.hidden_states(tokens, kv_cache, attention_mask))

_compiled_block = None


def compiled_block():
    """Block.__call__ under torch.compile with dynamic shapes: one graph (forward and backward) serves every
    layer, batch and length, with one more for each kind of mask (none, padding). The fast path of the training
    forwards (Transformer.compile_blocks, --compile); the eager Block is the reference it is tested against."""
    global _compiled_block
    if _compiled_block is None:
        _compiled_block = torch.compile(Block.__call__, dynamic=True)
    return _compiled_block


def transformer_on(config, tensors, vocab_limit):
    """A Transformer holding `tensors` (a state dict) themselves, nothing copied, the tied head re-tied, e.g.
    a LoRA model's frozen base (lora.without_adapters) or an FSDP model's gathered weights."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(tensors, assign=True)  # assign: takes the tensors, does not copy into new ones
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.vocab_limit = vocab_limit
    return model


# -----------------------------------------------------------------------------
# Sampling: the plain reference versions first, then the fast ones that generate() uses (tested against them)


def sample_next_token_reference(logits, generator=None, temperature=1.0, top_p=1.0):
    """logits (B, V) -> token ids (B,): the sampling rule, written plainly. temperature 0 = argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)             # (B, V)
    sorted_probs, ids = probs.sort(dim=-1, descending=True)             # (B, V) each, most likely first
    if top_p < 1.0:
        # top-p / nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose mass
        # reaches top_p, i.e. drop a token when the tokens ranked above it already hold >= top_p (the top one stays)
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=generator)    # (B, 1); renormalises the survivors
    return ids.gather(-1, choice).squeeze(-1)


def inverse_cdf(probs, u, block=1024):
    """probs (B, V) >= 0 (any total), u (B, 1) uniform in [0, 1) -> (B, 1) the index i with
    cdf[i-1] <= u * total < cdf[i]. Two levels, so no float64 cumsum runs over the whole vocabulary: first the
    cumulative mass of blocks of `block` ids picks a block, then a cumsum inside that block picks the id.
    The cumulative sums use u's dtype: float64, or float32 on Apple's MPS, which has no float64."""
    B, V = probs.shape
    padded = F.pad(probs, (0, -V % block))                              # (B, nb * block), zero mass at the end
    blocks = padded.view(B, -1, block)                                  # (B, nb, block)
    # block masses summed in float32 (no wide copy of all V), accumulated across blocks in u's dtype (float64): a
    # block's share is right to ~1e-7 relative; inside the chosen block every id keeps its exact float64 share
    block_cdf = blocks.sum(dim=-1).to(u.dtype).cumsum(dim=-1)            # (B, nb)
    # stay strictly below the total, so rounding can never pick a zero-mass block or id (e.g. masked ids)
    below = lambda x, top: torch.minimum(x, torch.nextafter(top, torch.zeros_like(top)))
    target = below(u * block_cdf[:, -1:], block_cdf[:, -1:])            # (B, 1)
    b = torch.searchsorted(block_cdf, target, right=True)               # (B, 1) the chosen block
    mass_before = torch.where(b > 0, block_cdf.gather(-1, (b - 1).clamp(min=0)), 0.0)
    inner_cdf = blocks.gather(1, b.unsqueeze(-1).expand(B, 1, block)).squeeze(1).cumsum(-1, dtype=u.dtype)
    offset = below((target - mass_before).clamp(min=0.0), inner_cdf[:, -1:])
    return b * block + torch.searchsorted(inner_cdf, offset, right=True)


def uniforms(n, generator, device):
    """n uniforms in [0, 1) from generator: float64, or float32 on Apple's MPS, which has no float64."""
    return torch.rand(n, generator=generator, device=device,
                      dtype=torch.float32 if torch.device(device).type == "mps" else torch.float64)


def sample_next_token(logits, generator=None, temperature=1.0, top_p=1.0, u=None):
    """sample_next_token_reference's distribution, drawn faster: one uniform per row, u (B,) when given (generate
    draws them), else from `generator`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    # softmax without its division: inverse_cdf scales by each row's total anyway (one pass over V saved)
    probs = (scaled - scaled.amax(dim=-1, keepdim=True)).exp()          # (B, V) unnormalised
    ids = None
    if top_p < 1.0:
        probs = probs / probs.sum(dim=-1, keepdim=True)                 # top-p compares normalised mass
        # top-p, the reference's rule: drop a token when the tokens ranked above it already hold >= top_p
        probs, ids = probs.sort(dim=-1, descending=True)                # (B, V) each
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    # Inverse-CDF sampling: one uniform draw per row, located in the cumulative distribution (float64 inside the
    # chosen block, so even 1e-10 probabilities keep their share); exact, and cheaper on a large vocabulary than
    # torch.multinomial, which draws one exponential per id. Scaling by the total renormalises top-p survivors.
    u = uniforms(probs.shape[0], generator, probs.device) if u is None else u
    choice = inverse_cdf(probs, u[:, None])                             # (B, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def next_token_logits(model, h, vocab_limit=None):
    """h (B, C) last hidden states -> float32 logits (B, V') over the ids < vocab_limit (model.vocab_limit when
    None)."""
    vocab_limit = vocab_limit or model.vocab_limit
    if h.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        # the reference: one matmul with the whole weight, then the slice. Autocast caches its bf16 copy of a
        # weight (a leaf) for the whole block, but would re-cast a slice of it at every decode step.
        return F.linear(h, model.lm_head.weight)[:, :vocab_limit].float()
    weight = model.lm_head.weight[:vocab_limit]                          # (V', C)
    # CPU fast path, the same product as weight @ h^T in blocks of 2048 vocabulary rows, each block written
    # transposed into the output: each partial product stays in cache, which beats one h @ weight^T over a 150k
    # vocabulary on CPU, and that matmul is most of a decode step (bench.py measures both).
    logits = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32)  # (B, V')
    for start in range(0, weight.shape[0], 2048):
        logits[:, start:start + 2048] = (weight[start:start + 2048] @ h.t()).t()
    return logits


def check_generate_args(model, prompts, max_new_tokens, temperature, top_p, num_samples, vocab_limit):
    V = model.config.vocab_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts (lists of token ids)")
    if temperature < 0 or not 0 < top_p <= 1 or num_samples < 1 or max_new_tokens < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, num_samples >= 1, max_new_tokens >= 0; got "
                         f"{temperature}, {top_p}, {num_samples}, {max_new_tokens}")
    if vocab_limit is not None and not 0 < vocab_limit <= V:
        raise ValueError(f"vocab_limit must be in 1..{V} (the model's vocab_size), got {vocab_limit}")
    T0 = max(len(p) for p in prompts)
    if T0 + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"longest prompt ({T0}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.config.max_seq_len}; shorten one of them")
    if max(max(p) for p in prompts) >= V or min(min(p) for p in prompts) < 0:
        raise ValueError(f"prompt token ids must lie in 0..{V - 1}")


# no_grad, not inference_mode: under inference_mode autocast does not cache its bf16 copies of the weights, so
# every decode step would cast every weight again (about 3x the weight traffic per token)
@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=(), seed=None,
             num_samples=1, vocab_limit=None, decode="eager", batch_rows=None):
    """Sample num_samples completions of each prompt (lists of token ids) -> the new tokens of each row (layout: step
    3), ending after its first stop id (kept) or max_new_tokens. Only ids < vocab_limit (model.vocab_limit if
    None) are sampled. Under bf16 autocast the KV cache is bf16 too. decode: "eager" (below), or "static" /
    "compiled": the same tokens from decode_static's fixed-shape step, run as it is or under torch.compile.
    Randomness: at every step one uniform is drawn from the seed for each row of the batch, finished or not, and
    a row's token comes from its own uniform. batch_rows=(first, total): these rows are rows first .. first+B-1
    of a batch of `total` rows that several processes sample (torchrun); each draws all `total` uniforms and
    uses its own, so a batch split across ranks gives the samples of one process. None: (0, B)."""
    # 1. validate
    check_generate_args(model, prompts, max_new_tokens, temperature, top_p, num_samples, vocab_limit)
    if decode not in ("eager", "static", "compiled"):
        raise ValueError(f"decode must be eager, static or compiled, got {decode!r}")
    vocab_limit = vocab_limit or model.vocab_limit
    lengths = [len(p) for p in prompts]
    P, G, T0 = len(prompts), num_samples, max(lengths)
    first, total = batch_rows or (0, P * G)
    if not 0 <= first <= total - P * G:
        raise ValueError(f"batch_rows={batch_rows}: {P * G} rows starting at row {first} do not fit a batch of {total}")
    device, dtype = model.embed_tokens.weight.device, compute_dtype(model)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        # 2. left-pad so every row's last prompt token sits in the same (last) column; prefill each prompt once
        tokens = torch.zeros(P, T0, dtype=torch.long)                    # (P, T0)
        for i, p in enumerate(prompts):
            tokens[i, T0 - len(p):] = torch.tensor(p)
        mask = torch.arange(T0) >= T0 - torch.tensor(lengths)[:, None]  # (P, T0) True on the real tokens
        pin = device.type == "cuda"  # pinned host memory lets the copy run asynchronously
        tokens = (tokens.pin_memory() if pin else tokens).to(device, non_blocking=pin)
        mask = None if min(lengths) == T0 else (mask.pin_memory() if pin else mask).to(device, non_blocking=pin)
        cache_len = T0 + max_new_tokens
        if decode != "eager":
            cache_len = static_cache_len(cache_len, model.config.max_seq_len)
        kv_cache = KVCache(model.config, P, T0 if decode != "eager" else cache_len, device, dtype)
        # logits only over ids < vocab_limit, so ids past it (Qwen's untrained padding rows) are never sampled
        logits = next_token_logits(model, model.hidden_states(tokens, kv_cache, mask)[:, -1], vocab_limit)  # (P, V')
        # 3. copy each prompt's cache and last logits into its G sample rows. The output layout, defined here
        # only: B = P * G rows, prompt 0's G rows first, then prompt 1's, ...
        B = P * G
        rows = torch.arange(P, device=device).repeat_interleave(G)      # (B,) = 0,0,..,1,1,..
        logits = logits[rows] if G > 1 else logits                      # (B, V')
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        if decode != "eager":  # the static loop copies the prompts' cache into its own, kept buffers
            cache = StaticColumnCache(model.config, kv_cache, rows, cache_len)
            out = decode_static(model, cache, logits, max_new_tokens, generator, temperature, top_p, stop,
                                vocab_limit, (first, total), compiled=decode == "compiled")
            return cut_after_stop(out.tolist(), stop_ids)
        if G > 1:
            kv_cache.select(rows)
        out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)  # (B, max_new)
        row_ids = torch.arange(B, device=device)    # which output row each active batch row writes
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # 4. decode one token per step for every active row
        for step in range(max_new_tokens):
            u = uniforms(total, generator, device)[first + row_ids]               # (B,) the active rows' own
            next_token = sample_next_token(logits, None, temperature, top_p, u)        # (B,)
            out[row_ids, step] = next_token
            finished |= torch.isin(next_token, stop)
            if step == max_new_tokens - 1:
                break
            # every 8 steps (one host sync) stop if all rows are done, else drop the finished rows from the batch
            if step % 8 == 7:
                keep = (~finished).nonzero().squeeze(-1)
                if len(keep) == 0:
                    break
                if len(keep) < len(row_ids):
                    kv_cache.select(keep)
                    row_ids, next_token, finished = row_ids[keep], next_token[keep], finished[keep]
            logits = next_token_logits(model, model.hidden_states(next_token[:, None], kv_cache)[:, -1], vocab_limit)
        # 5. one transfer to the host, then cut each row after its first stop id (and so the -1 of dropped rows)
        return cut_after_stop(out.tolist(), stop_ids)
    finally:
        model.train(was_training)


def cut_after_stop(rows, stop_ids):
    """Each row (a list of ids) up to and including its first stop id."""
    stop_set = set(stop_ids)
    return [row[:next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))] for row in rows]

# -----------------------------------------------------------------------------
# The decode loop with static shapes, for torch.compile and CUDA graphs (tested against generate's eager loop)
#
# generate's loop changes shapes as it goes: the cache's filled length is a Python int that grows every step, and
# finished rows are dropped. A compiled step wants few shapes and no host reads every time. Here the cache stays
# preallocated, kept from one call to the next (DecodeBuffers), and every step attends over a window of its first
# `width` columns, masked to the columns written so far, with width the filled length rounded up to a multiple of
# 64 (so the attention reads little more than the eager loop's, and a step sees one shape per 64 tokens); the
# column to write is a tensor; finished rows stay in the batch (their tokens are discarded) and the host checks
# for the end every 8 steps only, when the batch is also cut down to the next power of two that holds the rows
# still going (a few batch sizes). The attention sums gain only masked (zero) terms, so the tokens are the eager
# loop's.

WINDOW_STEP = 64  # the attention window grows in steps of this many cache columns


def static_cache_len(length, max_seq_len):
    """The columns the static loop's cache needs for `length` = prompt + new tokens: whole windows (capped at
    max_seq_len unless length is longer), plus one window more than a step ever reads. A window as wide as the
    whole cache would be contiguous and the others are not, and torch.compile would make a second graph for it."""
    return min(-(-length // WINDOW_STEP) * WINDOW_STEP, max(length, max_seq_len)) + WINDOW_STEP


class DecodeBuffers:
    """What the static loop's cache is made of: per layer (R, H_kv, T_max, D) keys and values, key_mask (R, T_max),
    next_pos (R,) and column, a 0-dim long tensor, with R rows and T_max columns at least those asked. Made once and
    kept from one generate call to the next (decode_buffers), each tensor marked as a static address for
    torch.compile: CUDA graphs record the step's kernels with these addresses and write the cache in place on every
    replay, as they do a model's weights. (CUDA graph trees run a graph that writes into any other input without
    CUDA graphs, and record a graph again when a static input moves: a cache made anew by each call would give one
    or the other.)"""

    def __init__(self, config, rows, max_len, device, dtype):
        kv_cache = KVCache(config, rows, max_len, device, dtype)
        self.keys, self.values = kv_cache.keys, kv_cache.values
        self.key_mask, self.next_pos = kv_cache.key_mask, kv_cache.next_pos
        self.column = torch.zeros((), dtype=torch.long, device=device)
        for t in (*self.keys, *self.values, self.key_mask, self.next_pos, self.column):
            torch._dynamo.mark_static_address(t)

    def fits(self, config, rows, max_len, device, dtype):
        k = self.keys[0]
        return (len(self.keys), k.shape[1], k.shape[3], k.dtype, k.device) == (
            config.n_layers, config.n_kv_heads, config.head_dim, dtype, torch.device(device)) and \
            k.shape[0] >= rows and k.shape[2] >= max_len


_decode_buffers = None


def decode_buffers(config, rows, max_len, device, dtype):
    """The kept DecodeBuffers if they hold rows x max_len of this shape and dtype, else new ones (the old freed
    first); they only grow, so a run's rollouts and evaluations soon share one set. free_decode_buffers lets go."""
    global _decode_buffers
    if _decode_buffers is None or not _decode_buffers.fits(config, rows, max_len, device, dtype):
        if _decode_buffers is not None and _decode_buffers.fits(config, 0, 0, device, dtype):  # grow, never shrink
            old = _decode_buffers.keys[0]
            rows, max_len = max(rows, old.shape[0]), max(max_len, old.shape[2])
        _decode_buffers = None
        _decode_buffers = DecodeBuffers(config, rows, max_len, device, dtype)
    return _decode_buffers


def free_decode_buffers():
    global _decode_buffers
    _decode_buffers = None


class StaticColumnCache:
    """The static loop's cache: the first B rows of the kept DecodeBuffers (each a tensor of its own over their
    memory, marked static as well), written at `column`, the same for every row."""

    def __init__(self, config, kv_cache, rows, max_len):
        """kv_cache: the prompts' prefilled KVCache; rows (B,): the prompt of each batch row; max_len: the columns
        (static_cache_len). Copies each prompt's keys, values, key mask and position into its rows; the columns
        after the prompt are real tokens to be."""
        B, L = len(rows), kv_cache.length
        buffers = decode_buffers(config, B, max_len, kv_cache.next_pos.device, kv_cache.keys[0].dtype)
        for kept, prefilled in ((buffers.keys, kv_cache.keys), (buffers.values, kv_cache.values)):
            for buffer, layer in zip(kept, prefilled):
                buffer[:B, :, :L] = layer[rows, :, :L]
        buffers.key_mask[:B] = True
        buffers.key_mask[:B, :L] = kv_cache.key_mask[rows, :L]
        buffers.next_pos[:B] = kv_cache.next_pos[rows]
        buffers.column.fill_(L)
        self.buffers, self.column, self.prompt_len = buffers, buffers.column, L
        self.max_len = buffers.key_mask.shape[1]  # the buffers' columns: max_len or more
        self.use_rows(B)

    def use_rows(self, B):
        # x[:B].detach(): the first B rows, a tensor of its own over the same memory rather than a view, so that
        # torch.compile guards on its shape alone, not on how it relates to the whole buffer (more graphs)
        b = self.buffers
        self.keys = [k[:B].detach() for k in b.keys]                                   # (B, H_kv, T_max, D) each
        self.values = [v[:B].detach() for v in b.values]
        self.key_mask, self.next_pos = b.key_mask[:B].detach(), b.next_pos[:B].detach()  # (B, T_max), (B,)
        for t in (*self.keys, *self.values, self.key_mask, self.next_pos):
            torch._dynamo.mark_static_address(t)

    def compact(self, keep, filled):
        """Rows keep (B',) move to the first B' rows, in place; of keys and values only the `filled` columns
        written so far."""
        for kept in (self.buffers.keys, self.buffers.values):
            for buffer in kept:
                buffer[:len(keep), :, :filled] = buffer[keep, :, :filled]  # the right side is gathered first
        self.buffers.key_mask[:len(keep)] = self.key_mask[keep]
        self.buffers.next_pos[:len(keep)] = self.next_pos[keep]
        self.use_rows(len(keep))


class CacheWindow:
    """What one decode step's attention layers see of a StaticColumnCache: its first `width` columns."""

    def __init__(self, cache, width):
        self.cache, self.width = cache, width

    def update(self, layer_idx, k, v):
        # k, v (B, H_kv, 1, D) into column `column`; attention then reads the window, masked
        keys, values, column = self.cache.keys[layer_idx], self.cache.values[layer_idx], self.cache.column.view(1)
        keys.index_copy_(2, column, k)
        values.index_copy_(2, column, v)
        return keys[:, :, :self.width], values[:, :, :self.width]                # (B, H_kv, width, D)


def window_width(filled, max_len):
    """The attention window of a step whose token goes to column `filled`: a multiple of WINDOW_STEP past it."""
    return min(max_len, (filled // WINDOW_STEP + 1) * WINDOW_STEP)


def decode_step(model, token, cache, vocab_limit, width):
    """token (B,) at each row's next position -> float32 logits (B, V') for the token after it; writes the cache
    column and moves column and positions on by one; attends over the cache's first `width` columns (width >
    column). Shapes depend on B and width alone: torch.compile(fullgraph=True) takes it."""
    visible = cache.key_mask[:, :width] & (torch.arange(width, device=token.device) <= cache.column)  # (B, width)
    attn_mask = visible[:, None, None, :]                                                 # (B, 1, 1, width)
    cos, sin = rope_cos_sin(cache.next_pos[:, None], model.config, compute_dtype(model))   # (B, 1, 1, D)
    x = model.embed_tokens(token[:, None])                                                # (B, 1, C)
    window = CacheWindow(cache, width)
    for layer in model.layers:
        x = layer(x, cos, sin, attn_mask, False, window)
    cache.column += 1
    cache.next_pos += 1
    return next_token_logits(model, model.norm(x)[:, -1], vocab_limit)


_compiled_decode_step = None


def decode_static(model, cache, logits, max_new_tokens, generator, temperature, top_p, stop, vocab_limit,
                  batch_rows, compiled=False):
    """generate's step 4 with static shapes, from the StaticColumnCache of the B rows and their last logits
    (B, V') -> out (B, max_new_tokens) ids, -1 after a row's end; batch_rows (first, total) as in generate.
    compiled: the step under torch.compile(fullgraph=True, dynamic=True), one graph for every batch size and window
    (on CUDA with CUDA graphs, mode="reduce-overhead", which records one per shape)."""
    global _compiled_decode_step
    step_fn = decode_step
    if compiled:
        if _compiled_decode_step is None:
            # CUDA: CUDA graphs replay the step's kernels with one launch. CPU: the graph's kernel calls in C++,
            # not Python (cpp_wrapper: 10-15% off a step of the default model)
            kwargs = dict(mode="reduce-overhead") if logits.is_cuda else dict(options={"cpp_wrapper": True})
            _compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=True, **kwargs)
        step_fn = _compiled_decode_step
    prefill_len, max_len, B = cache.prompt_len, cache.max_len, logits.shape[0]
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=logits.device)  # (B, max_new)
    row_ids = torch.arange(B, device=logits.device)  # which output row each batch row writes
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    first, total = batch_rows
    for step in range(max_new_tokens):
        u = uniforms(total, generator, logits.device)[first + row_ids]    # (B,) the eager loop's uniforms
        next_token = sample_next_token(logits, None, temperature, top_p, u)  # (B,)
        out[row_ids, step] = next_token.masked_fill(finished, -1)  # a finished row writes nothing more
        finished |= torch.isin(next_token, stop)
        if step == max_new_tokens - 1:
            break
        if step % 8 == 7:  # a host sync every 8 steps, as in the eager loop
            alive = (~finished).nonzero().squeeze(-1)
            if len(alive) == 0:
                break
            bucket = 1 << (len(alive) - 1).bit_length()  # the power of two that holds the rows still going
            if bucket < len(row_ids):  # compact to it (a few batch sizes: a few compiled graphs), topped up
                keep = torch.cat([alive, finished.nonzero().squeeze(-1)[:bucket - len(alive)]])  # with ended rows
                cache.compact(keep, filled=prefill_len + step)  # the columns written so far are copied
                row_ids, next_token, finished = row_ids[keep], next_token[keep], finished[keep]
        # next_token.detach(): not a view (sampling's is one, a compacted batch's not), so one graph serves both
        logits = step_fn(model, next_token.detach(), cache, vocab_limit, window_width(prefill_len + step, max_len))
        if compiled and logits.is_cuda:
            logits = logits.clone()  # CUDA graphs reuse their output buffer on the next replay
    return out
