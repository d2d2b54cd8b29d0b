"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685) for model.py's
Transformer: a frozen base, trainable low-rank adapters on every block's Linears, and the merged plain weights.

train.py --lora_rank=R calls add_lora at the start of RL; hf_io.save_hf writes merged_state_dict, so a LoRA run's
checkpoints load like any other; lora_state_dict / load_lora carry the adapters through --resume.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import transformer_on

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every block's Linears


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update. The LoRA paper's eq. (3), h = W0 x + B A x, with its
    alpha / r scaling (section 4.1), in row form: y = x W^T + b + (alpha / r) * (x A^T) B^T, A (r, in) Gaussian,
    B (out, r) zeros (section 4.1), so at the start y is exactly the frozen layer's output. The frozen weight and
    bias keep the names `weight` and `bias`, so the merged state dict has the plain model's (Hugging Face's) names.
    The adapters are float32; base_dtype (bf16 under bf16 autocast: what autocast would cast a frozen weight to on
    every forward anyway, so the products are the same) stores the frozen weight in it."""

    def __init__(self, base: nn.Linear, rank, alpha, base_dtype=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, alpha / rank
        dtype = base_dtype or base.weight.dtype
        self.weight = nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)   # (out, in) frozen
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        device = base.weight.device
        # A ~ N(0, 1/in): each (x A^T)_j starts at x's scale; the paper asks only for "a random Gaussian"
        self.lora_A = nn.Parameter(torch.randn(rank, self.in_features, device=device) / self.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))     # (out, r)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                               # (..., out) the frozen layer
        # in x's dtype (a no-op but under pure bf16, where float32 adapters meet bf16 activations)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + self.scale * F.linear(F.linear(x, A), B)                   # (..., r) then (..., out)

    def merged_weight(self, dtype):
        """W + (alpha / r) B A (the paper's section 4.2: merged, inference costs nothing extra), in dtype."""
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(dtype)


def add_lora(model, rank, alpha, base_dtype=None):
    """Swap every block's q/k/v/o/gate/up/down Linear for a LoRALinear and freeze every other parameter
    (embeddings, norms, lm_head): afterwards only the adapters require gradients. -> model (changed in place)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, base_dtype))
    return model


def lora_layers(model):
    """{module name: LoRALinear} of a model (empty without adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model):
    """The adapters alone, {"layers.0.self_attn.q_proj.lora_A": (r, in), ...}: what a LoRA run's resume needs
    besides the frozen base."""
    return {f"{name}.{p}": getattr(m, p).detach().clone() for name, m in lora_layers(model).items()
            for p in ("lora_A", "lora_B")}


def load_lora(model, tensors):
    """Copy lora_state_dict's tensors into a model that has the same adapters; ValueError if they differ."""
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    if params.keys() != tensors.keys() or any(params[n].shape != t.shape for n, t in tensors.items()):
        raise ValueError("the saved LoRA adapters do not match this model's (another --lora_rank or model?)")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def merged_state_dict(model):
    """model.state_dict() with every adapter merged into its weight (LoRALinear.merged_weight) and the adapters
    left out: a plain Transformer's names, shapes and dtype (the embedding's). Without adapters: the state dict."""
    dtype, layers = model.embed_tokens.weight.dtype, lora_layers(model)
    out = {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in layers:
            if leaf in ("weight", "bias"):
                out[name] = layers[module].merged_weight(dtype) if leaf == "weight" else t.to(dtype)
        else:
            out[name] = t
    return out


def without_adapters(model):
    """A plain Transformer on the same frozen tensors as a LoRA model (nothing copied): the base model, e.g. the
    KL reference of a LoRA run."""
    frozen = {name: t for name, t in model.state_dict(keep_vars=True).items() if ".lora_" not in name}
    return transformer_on(model.config, frozen, model.vocab_limit).requires_grad_(False).eval()
