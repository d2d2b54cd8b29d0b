"""LoRA (lora.add_lora): at B = 0 the model is the plain model exactly; a LoRA layer computes the paper's
x W^T + b + (alpha / r) (x A^T) B^T (checked in float64 by hand); only the adapters train; the merged weights,
saved by save_hf and read back by load_qwen, give the LoRA model's logits under the plain model's names."""
import os

import pytest
import torch

from hf_io import load_qwen, load_safetensors, save_hf
from lora import LoRALinear, add_lora, load_lora, lora_state_dict, merged_state_dict, without_adapters
from model import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def plain_and_lora(rank=4, alpha=8.0, base_dtype=None):
    torch.manual_seed(0)
    plain = Transformer(CONFIG)
    lora = Transformer(CONFIG)
    lora.load_state_dict(plain.state_dict())
    return plain, add_lora(lora, rank, alpha, base_dtype)


def randomise_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)


def test_at_b_zero_the_lora_model_is_the_plain_model_exactly():
    plain, lora = plain_and_lora()
    assert torch.equal(plain(TOKENS), lora(TOKENS))
    # under bf16 autocast with the frozen weights stored in bf16: the same bf16 products autocast makes
    plain, lora = plain_and_lora(base_dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(plain(TOKENS), lora(TOKENS))


def test_a_lora_layer_is_the_papers_formula_in_float64():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    W, b, A, B = (t.double() for t in (base.weight, base.bias, layer.lora_A, layer.lora_B))
    want = x.double() @ W.T + b + (6.0 / 3) * (x.double() @ A.T) @ B.T
    assert torch.allclose(layer(x).double(), want, atol=1e-5)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
    assert torch.allclose(layer.merged_weight(torch.float64), W + 2.0 * B @ A, atol=1e-6)


def test_only_the_adapters_train():
    _, lora = plain_and_lora(rank=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # per block: q 32->32, k 32->16, v 32->16, o 32->32, gate 32->48, up 32->48, down 48->32, r (in + out) each
    per_block = 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 2 * (32 + 48) + (48 + 32))
    assert sum(lora.get_parameter(n).numel() for n in trainable) == 2 * per_block
    randomise_b(lora)
    lora(TOKENS).sum().backward()
    for name, p in lora.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_merged_weights_save_as_a_plain_checkpoint_with_the_lora_models_logits(tmp_path):
    plain, lora = plain_and_lora()
    randomise_b(lora)
    merged = merged_state_dict(lora)
    assert merged.keys() == plain.state_dict().keys()
    save_hf(lora, str(tmp_path / "m"))
    names = load_safetensors(os.path.join(tmp_path, "m", "model.safetensors")).keys()
    assert not any("lora" in n for n in names) and "model.layers.0.self_attn.q_proj.weight" in names
    loaded = load_qwen(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(loaded(TOKENS), lora(TOKENS), atol=1e-5)
        assert not torch.allclose(loaded(TOKENS), plain(TOKENS), atol=1e-3)  # the adapters did change it
    # the tensors without adapters (embedding, norms, biases) are the plain model's, bit for bit
    for name in ("embed_tokens.weight", "norm.weight", "layers.1.input_layernorm.weight",
                 "layers.0.self_attn.q_proj.bias"):
        assert torch.equal(loaded.get_parameter(name), plain.get_parameter(name)), name


def test_without_adapters_is_the_base_on_the_same_tensors():
    plain, lora = plain_and_lora()
    randomise_b(lora)
    base = without_adapters(lora)
    assert base.layers[0].mlp.up_proj.weight.data_ptr() == lora.layers[0].mlp.up_proj.weight.data_ptr()
    assert base.lm_head.weight is base.embed_tokens.weight
    assert torch.equal(base(TOKENS), plain(TOKENS))


def test_adapters_round_trip_and_a_mismatch_is_refused():
    _, lora = plain_and_lora()
    randomise_b(lora)
    _, other = plain_and_lora()
    load_lora(other, lora_state_dict(lora))
    assert torch.equal(other(TOKENS), lora(TOKENS))
    _, rank2 = plain_and_lora(rank=2)
    with pytest.raises(ValueError, match="do not match"):
        load_lora(rank2, lora_state_dict(lora))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(Transformer(CONFIG), 0, 1.0)


def test_the_merged_checkpoint_loads_in_transformers_with_the_lora_models_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, lora = plain_and_lora()
    randomise_b(lora)
    save_hf(lora, str(tmp_path))
    theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(TOKENS).logits, lora(TOKENS), atol=1e-5)
