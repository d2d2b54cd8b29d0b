"""Reading and writing Hugging Face checkpoint directories (config.json + safetensors) for model.py's Transformer,
with struct and json only (no safetensors package); load_qwen streams each tensor from disk into its parameter."""
import json
import math
import os
import struct

import torch

from lora import merged_state_dict
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, and an
# optional "__metadata__": {str: str}}, then the raw little-endian tensor bytes (offsets relative to their start)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def read_safetensors_header(path):
    """-> (header dict without __metadata__, byte offset where tensor data starts). Validates every entry."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= n <= file_size - 8:
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {file_size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ValueError(f"{path}: safetensors header is not a valid JSON object (corrupt file?)") from None
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, file_size - 8 - n
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            numel = math.prod(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: bad header entry for tensor {name!r}: {entry!r} (supported dtypes: "
                             f"{', '.join(SAFETENSORS_DTYPES)})") from None
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ValueError(f"{path}: tensor {name!r} has shape {entry['shape']} {entry['dtype']} but its "
                             f"data_offsets span {end - begin} bytes")
        if end > data_size:
            raise ValueError(f"{path}: file is truncated: the header says tensor {name!r} ends at byte "
                             f"{data_start + end} but the file has only {file_size} bytes (re-download it)")
    return header, data_start


def load_safetensors(path):
    """-> {name: tensor}, memory-mapped (pages are read from disk on first touch; copy-on-write if modified)."""
    header, data_start = read_safetensors_header(path)
    file_size = os.path.getsize(path)
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=file_size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage)  # (file_size,) uint8 view of the mapping
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        raw = data[data_start + begin:data_start + end]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        if (data_start + begin) % dtype.itemsize:  # misaligned for this dtype: copy before reinterpreting
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} as one safetensors file (atomically: a temp file renamed into place)."""
    header, offset = {}, 0
    # widest dtypes first keeps every tensor aligned to its element size, as the reference writer does
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    for name in names:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"cannot save tensor {name!r}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so tensor data starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# Hugging Face checkpoint directories


def entry_name(ours):
    # our parameter name -> its name in a Hugging Face checkpoint (everything but lm_head lives under "model.")
    return ours if ours == "lm_head.weight" else "model." + ours


def vocab_limit_of(path, rows):
    """How many of the embedding's rows are token ids: the n_vocab of the tokenizer beside the weights
    (Qwen2.5: 151,665 ids, 151,936 rows), or all rows when the directory has no tokenizer."""
    try:
        n_vocab = load_tokenizer(path).n_vocab
    except FileNotFoundError:
        return rows
    if n_vocab > rows:
        raise ValueError(f"{path}: the tokenizer has {n_vocab} ids but the model only {rows} embedding rows")
    return n_vocab


def load_qwen(path, device="cpu", dtype=None):
    """Load a Hugging Face Qwen2 checkpoint directory (config.json + safetensors) into a Transformer in eval mode,
    with model.vocab_limit from the tokenizer files beside it (vocab_limit_of).
    dtype=None keeps the checkpoint's dtype. Each tensor is read from disk straight into its parameter."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {path!r}; expected a Hugging Face model directory")
    with open(config_path) as f:
        config = ModelConfig.from_hf(json.load(f))
    # which file holds which tensor
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (ValueError, KeyError):
            raise ValueError(f"{index_path} is not valid JSON with a 'weight_map'") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        weight_map, files = {}, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                                f"(only safetensors checkpoints are supported, not pytorch_model.bin)")
    for file in files:
        if not os.path.isfile(os.path.join(path, file)):
            raise FileNotFoundError(f"shard {file!r} named in model.safetensors.index.json is missing from {path!r}")
    found = {}  # our parameter name -> (file, header entry, data start)
    for file in files:
        header, data_start = read_safetensors_header(os.path.join(path, file))
        for name, entry in header.items():
            ours = name.removeprefix("model.")
            if ours.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE table; we recompute it
                continue
            found[ours] = (file, entry, data_start)
    # build without allocating (meta device), check names/shapes/dtypes, then allocate once on the target device
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())  # named_parameters lists a tied weight once, as embed_tokens
    if config.tie_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints still store a copy; the embedding wins
    for ours, (file, entry, _) in found.items():
        if ours not in expected:
            raise ValueError(f"unexpected tensor {entry_name(ours)!r} in {file} (not part of a Qwen2 model with "
                             f"this config.json)")
        param = expected[ours]
        if list(entry["shape"]) != list(param.shape):
            raise ValueError(f"tensor {entry_name(ours)!r} in {file} has shape {entry['shape']}, "
                             f"expected {list(param.shape)} from config.json")
        if not SAFETENSORS_DTYPES[entry["dtype"]].is_floating_point:
            raise ValueError(f"tensor {entry_name(ours)!r} in {file} has dtype {entry['dtype']}, expected a float")
    missing = [name for name in expected if name not in found]
    if missing:
        where = weight_map.get(entry_name(missing[0]), files[0] if len(files) == 1 else "every shard")
        raise ValueError(f"tensor {entry_name(missing[0])!r} missing from {where} in {path!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if dtype is None:
        dtype = SAFETENSORS_DTYPES[found["embed_tokens.weight"][1]["dtype"]]
    model = model.to(dtype).to_empty(device=device)  # uninitialised memory: every byte is filled below
    if config.tie_embeddings:  # to_empty gives the two modules separate tensors; share one again
        model.lm_head.weight = model.embed_tokens.weight
    # stream file by file, tensor by tensor, in file order: peak memory ~ the weights plus one tensor
    params = dict(model.named_parameters())
    for file in files:
        entries = sorted(((e[2] + e[1]["data_offsets"][0], ours, e[1]) for ours, e in found.items() if e[0] == file))
        with open(os.path.join(path, file), "rb", buffering=0) as f:
            for offset, ours, entry in entries:
                param, src_dtype = params[ours], SAFETENSORS_DTYPES[entry["dtype"]]
                direct = param.device.type == "cpu" and src_dtype == param.dtype  # else: stage one tensor on CPU
                buf = param.data if direct else torch.empty(param.shape, dtype=src_dtype)
                f.seek(offset)
                view = memoryview(buf.view(-1).view(torch.uint8).numpy())
                while len(view):  # readinto may return fewer bytes than asked
                    n = f.readinto(view)
                    if not n:
                        raise ValueError(f"{file}: unexpected end of file while reading {entry_name(ours)!r}")
                    view = view[n:]
                if not direct:
                    param.data.copy_(buf)  # converts dtype and/or moves to the device
    model.vocab_limit = vocab_limit_of(path, config.vocab_size)
    return model.eval()


def save_hf(model, directory, max_shard_bytes=5 * 10**9):
    """Write config.json + model.safetensors (LoRA adapters merged), or shards model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json when the weights exceed max_shard_bytes. Loads in transformers as-is."""
    os.makedirs(directory, exist_ok=True)
    dtype = model.embed_tokens.weight.dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=2)
    # a LoRA model's adapters are merged into their weights (W + alpha/r B A): a plain Qwen2 directory either way
    tensors = {entry_name(name): t for name, t in merged_state_dict(model).items()
               if not (name == "lm_head.weight" and model.config.tie_embeddings)}  # tied: HF re-ties on load
    shards, size = [{}], 0  # greedy fill in module order
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(files, shards):
        save_safetensors(shard, os.path.join(directory, file), metadata={"format": "pt"})  # HF requires "pt"
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if n > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in shard}}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    for stale in os.listdir(directory):  # weights from an earlier save would confuse loaders
        if stale.startswith("model") and stale.endswith((".safetensors", ".index.json")) and stale not in files \
                and not (n > 1 and stale == "model.safetensors.index.json"):
            os.remove(os.path.join(directory, stale))

