"""Tests for hf_io.py's checkpoint I/O: the safetensors reader/writer, save_hf/load_qwen round trips on tiny
HF-layout directories the tests write themselves, the clear errors on broken checkpoints, and (when transformers
is installed) exact agreement with Hugging Face's Qwen2ForCausalLM."""
import dataclasses
import json
import os
import struct

import pytest
import torch

from hf_io import load_qwen, load_safetensors, save_hf, save_safetensors
from model import ModelConfig, Transformer, generate

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(TINY, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # every tensor, norms included, so a swapped or skipped tensor shows up
    return model.eval()


TOKENS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))

# ---------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 3).bfloat16(),
               "i64": torch.arange(5), "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 4)}
    path = tmp_path / "x.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    raw = path.read_bytes()  # the layout, checked by hand: u64 LE header length, JSON header, aligned data
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"} and header["bf16"]["dtype"] == "BF16"
    assert (8 + n) % 8 == 0 and len(raw) == 8 + n + max(e["data_offsets"][1] for k, e in header.items()
                                                          if k != "__metadata__")
    loaded = load_safetensors(path)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)


def test_safetensors_agrees_with_the_reference_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(4, 4).bfloat16(), "b": torch.randn(3).half(), "c": torch.arange(6).int()}
    save_safetensors(tensors, tmp_path / "ours.safetensors")
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    for ours, theirs in [(st.load_file(str(tmp_path / "ours.safetensors")), tensors),
                         (load_safetensors(tmp_path / "theirs.safetensors"), tensors)]:
        assert all(torch.equal(ours[k], theirs[k]) for k in tensors)


# ---------------------------------------------------------------------------- save_hf / load_qwen


@pytest.mark.parametrize("tied,dtype,shard_bytes", [(True, torch.float32, 10**9), (False, torch.float32, 10**9),
                                                    (True, torch.bfloat16, 10**9), (False, torch.float16, 20_000)])
def test_save_hf_then_load_qwen_gives_the_same_model(tmp_path, tied, dtype, shard_bytes):
    model = tiny_model(tie_embeddings=tied).to(dtype)
    save_hf(model, tmp_path, max_shard_bytes=shard_bytes)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    if shard_bytes < 10**9:
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"]
    names = set().union(*(load_safetensors(tmp_path / f).keys() for f in files))
    assert ("lm_head.weight" in names) == (not tied) and "model.embed_tokens.weight" in names
    loaded = load_qwen(tmp_path)  # dtype=None keeps the checkpoint's dtype
    assert loaded.embed_tokens.weight.dtype == dtype and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    assert load_qwen(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32
    # re-saving unsharded removes the old shards, so no stale index confuses a later load
    save_hf(model, tmp_path)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("model")) == ["model.safetensors"]


@pytest.fixture
def checkpoint(tmp_path):
    save_hf(tiny_model(tie_embeddings=False), tmp_path, max_shard_bytes=20_000)
    return tmp_path


def edit_tensors(directory, edit):
    """Rewrite the shard that holds model.norm.weight after applying edit(tensors) to its dict."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    file = directory / index["weight_map"]["model.norm.weight"]
    tensors = {k: v.clone() for k, v in load_safetensors(file).items()}
    edit(tensors)
    save_safetensors(tensors, file, metadata={"format": "pt"})
    return file.name


def test_load_qwen_names_a_missing_tensor_and_its_file(checkpoint):
    file = edit_tensors(checkpoint, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=rf"model\.norm\.weight.*missing from {file}"):
        load_qwen(checkpoint)


def test_load_qwen_names_a_wrong_shape_and_its_file(checkpoint):
    file = edit_tensors(checkpoint, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=rf"model\.norm\.weight.*{file}.*\[31\].*\[32\]"):
        load_qwen(checkpoint)


def test_load_qwen_names_an_unexpected_tensor(checkpoint):
    file = edit_tensors(checkpoint, lambda t: t.update({"model.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=rf"unexpected tensor 'model\.extra\.weight' in {file}"):
        load_qwen(checkpoint)


def shards(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def test_load_qwen_rejects_a_missing_shard(checkpoint):
    missing = shards(checkpoint)[1]
    os.remove(checkpoint / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_qwen(checkpoint)


def test_load_qwen_rejects_a_truncated_file(checkpoint):
    path = checkpoint / shards(checkpoint)[-1]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_qwen(checkpoint)


def test_load_qwen_rejects_a_bad_header(checkpoint):
    path = checkpoint / shards(checkpoint)[0]
    raw = path.read_bytes()
    path.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(ValueError, match="header"):
        load_qwen(checkpoint)
    path.write_bytes(struct.pack("<Q", 10**12) + raw[8:])  # header length beyond the file
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_qwen(checkpoint)


@pytest.mark.parametrize("key,value", [("use_sliding_window", True), ("rope_scaling", {"type": "dynamic"}),
                                       ("model_type", "qwen3")])
def test_load_qwen_rejects_unsupported_configs(checkpoint, key, value):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=key):
        load_qwen(checkpoint)


def test_load_qwen_rejects_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_qwen(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_qwen(tmp_path)


# ---------------------------------------------------------------------------- Hugging Face transformers as oracle

HF_CONFIGS = [dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
              dict(vocab_size=130, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                   num_key_value_heads=1, rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-5),
              dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=4, rope_theta=500.0, tie_word_embeddings=True)]


def hf_model(transformers, seed, **config):
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config, max_position_embeddings=128))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("i", range(len(HF_CONFIGS)))
def test_load_qwen_matches_transformers_logits_and_greedy_generation(tmp_path, i):
    transformers = pytest.importorskip("transformers")
    theirs = hf_model(transformers, i, **HF_CONFIGS[i])
    theirs.save_pretrained(tmp_path)
    ours = load_qwen(tmp_path)
    V = HF_CONFIGS[i]["vocab_size"]
    tokens = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)
        # bfloat16 too: the same op order (RMSNorm cast before the weight, float32 RoPE angles) makes it bit-exact
        ours_bf16 = load_qwen(tmp_path, dtype=torch.bfloat16)
        theirs_bf16 = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        assert torch.equal(ours_bf16(tokens), theirs_bf16(tokens).logits)
    # greedy, with left padding: the shorter prompt is padded by HF exactly as by us
    prompts = [tokens[0, :4].tolist(), tokens[1].tolist()]
    input_ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, 11 - len(p):], mask[r, 11 - len(p):] = torch.tensor(p), 1
    hf_out = theirs.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    assert generate(ours, prompts, 10, temperature=0) == hf_out[:, 11:].tolist()


def test_save_hf_output_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    for tied in (True, False):
        model = tiny_model(tie_embeddings=tied)
        save_hf(model, tmp_path / str(tied), max_shard_bytes=30_000)
        theirs = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / str(tied)).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(TOKENS).logits, model(TOKENS), atol=1e-4, rtol=0)
