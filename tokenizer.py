"""Tokenizers: Qwen2 / Qwen2.5 byte-level BPE on tiktoken, and a plain byte tokenizer for from-scratch models.

    from tokenizer import load_tokenizer, byte_tokenizer
    tok = load_tokenizer("Qwen2.5-3B")        # a directory with tokenizer.json, or vocab.json + merges.txt
    ids = tok.encode("<|im_start|>user\\n3 + 44 = 47<|im_end|>"); tok.decode(ids)

Byte-level BPE. Text is UTF-8 encoded, so any string is a sequence over 256 base symbols and nothing is ever
"unknown". A merge list, learned once, says which adjacent pair of symbols fuses into a longer token, earliest
merge first. Encoding a word repeatedly applies the earliest applicable merge until none applies.

Hugging Face files -> tiktoken. HF stores each token as a printable string through GPT-2's byte<->unicode map
(bytes that are not printable, e.g. space, are shifted to chr(256+k): " the" is "Ġthe"); we map those strings
back to raw bytes. tiktoken's merge loop fuses the pair whose *result* has the lowest rank; HF fuses the pair
earliest in merges.txt. The two agree when a token's rank is the position of the merge that creates it. When
the vocabulary's ids increase in merge order (expected for Qwen2, whose vocabulary began as a tiktoken file) the
ids themselves are the ranks; otherwise (checked at load) we rank by merge position and remap ranks to ids.
Added tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...) are cut out of the text before BPE, as HF does, so a
prompt template that writes them as text yields the single special id.

Choices, all mirroring Qwen2's tokenizer so ids match the checkpoint exactly:
  * NFC normalisation first: "e" + combining acute and the precomposed "é" must give the same ids, or the
    same visible text would tokenise two ways.
  * The pre-tokenizer regex (read from tokenizer.json) splits text into words before BPE; its \\p{N} takes ONE
    digit at a time, so 1234 is always the tokens 1,2,3,4. Countdown arithmetic then sees every number in the
    same digit-by-digit form instead of arbitrary multi-digit chunks that differ between 123 and 1234.
  * n_vocab is the largest id + 1 over vocabulary and added tokens (151665 for Qwen2.5), smaller than Qwen's
    151936-row embedding: the padding rows past it are never trained and must never be sampled.

Runtime dependencies: stdlib, numpy and tiktoken. Tests compare ids against Hugging Face `tokenizers`/`transformers`.
"""
import json
import os
import re
import shutil
import unicodedata
import warnings

import numpy as np
import tiktoken

# Qwen2's pre-tokenizer (GPT-4 style, but \p{N} without a {1,3} quantifier: single digits).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The system prompt Qwen2.5's chat template inserts when a conversation has none.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
BYTE_SPECIALS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
CHAT_ROLES = ("system", "user", "assistant")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by every byte-level HF vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    # The 68 remaining bytes (controls, space, NBSP, soft hyphen) get the next free code points, in byte order.
    table.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in table)})
    return table


class Tokenizer:
    """tiktoken-backed BPE with HF-compatible ids. Build with load_tokenizer(path) or byte_tokenizer()."""

    def __init__(self, *, mergeable_ranks, rank_to_id, id_to_bytes, special_tokens, pattern, nfc,
                 eos_token, pad_token, stop_ids=(), default_system=None, source_dir=None, config=None):
        try:  # specials are split out by us (see encode), so tiktoken only ever sees ordinary text
            self._bpe = tiktoken.Encoding("hf-bpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                          special_tokens={})
        except Exception as e:
            raise ValueError(f"tiktoken could not build the tokenizer (pre-tokenizer regex {pattern!r}): {e}") from e
        self._rank_to_id = rank_to_id          # None when ranks are already the ids (Qwen2)
        self._id_to_bytes = dict(id_to_bytes)  # every id -> its bytes, specials included (decode table)
        self.special_tokens = dict(special_tokens)
        for text, i in self.special_tokens.items():
            self._id_to_bytes[i] = text.encode("utf-8")
        # Longest first so that overlapping added tokens split like HF (leftmost-longest match).
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self.nfc = nfc
        self.n_vocab = max(self._id_to_bytes) + 1
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_id, self.pad_id = self.special_tokens[eos_token], self.special_tokens[pad_token]
        # Ids that end a generation: eos plus any extra eos ids from generation_config.json (Instruct lists both).
        self.stop_ids = tuple(dict.fromkeys([self.eos_id, *stop_ids]))
        self.is_instruct = eos_token == "<|im_end|>"
        self.default_system = default_system  # chat_template's system prompt when the messages have none
        self._source_dir, self._config = source_dir, dict(config or {})

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        pieces = self._special_re.split(text) if self._special_re else [text]
        ids = []
        for k, piece in enumerate(pieces):
            if k % 2:  # re.split with one group: odd positions are the added tokens themselves
                ids.append(self.special_tokens[piece])
                continue
            ranks = self._bpe.encode_ordinary(unicodedata.normalize("NFC", piece) if self.nfc else piece)
            ids.extend(ranks if self._rank_to_id is None else [self._rank_to_id[r] for r in ranks])
        return ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # accept tensors / numpy arrays
        try:
            data = b"".join([self._id_to_bytes[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if i not in self._id_to_bytes)
            raise ValueError(f"token id {bad!r} is not in the vocabulary (valid ids are < n_vocab={self.n_vocab}; "
                             "sample with vocab_limit=n_vocab)") from None
        # A token boundary can fall inside a multi-byte character; show U+FFFD there rather than fail.
        return data.decode("utf-8", errors="replace")

    def chat_template(self, messages, add_generation_prompt=True) -> str:
        """Qwen's ChatML: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message. Like Qwen2.5's template,
        a conversation that does not open with a system message gets self.default_system (None: no system)."""
        parts = []
        if self.default_system is not None and (not messages or messages[0].get("role") != "system"):
            parts.append(f"<|im_start|>system\n{self.default_system}<|im_end|>\n")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {m!r} must be a dict with role in {CHAT_ROLES} and str content")
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)

    def save(self, directory):
        """Write the files load_tokenizer(directory) needs to rebuild this tokenizer."""
        os.makedirs(directory, exist_ok=True)
        if self._source_dir is None:  # the byte tokenizer is fully described by its class name
            config = {"tokenizer_class": "ByteTokenizer", "eos_token": self.eos_token, "pad_token": self.pad_token,
                      "added_tokens": self.special_tokens}
        else:
            for name in ("tokenizer.json", "vocab.json", "merges.txt"):
                src, dst = os.path.join(self._source_dir, name), os.path.join(directory, name)
                if os.path.exists(src) and not (os.path.exists(dst) and os.path.samefile(src, dst)):
                    shutil.copyfile(src, dst)
            # Keep the checkpoint's config (chat_template etc.) so HF can load it too; pin eos/pad we resolved.
            config = {**self._config, "eos_token": self.eos_token, "pad_token": self.pad_token}
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def byte_tokenizer(default_system=None) -> Tokenizer:
    """ids 0..255 are the UTF-8 bytes, 256 <|endoftext|> (eos and pad), 257 <|im_start|>, 258 <|im_end|>."""
    single_bytes = {bytes([b]): b for b in range(256)}  # no merges: every byte stays its own token
    return Tokenizer(mergeable_ranks=single_bytes, rank_to_id=None, id_to_bytes={i: b for b, i in single_bytes.items()},
                     special_tokens=BYTE_SPECIALS, pattern=QWEN2_PATTERN, nfc=True, eos_token="<|endoftext|>",
                     pad_token="<|endoftext|>", default_system=default_system)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save the tokenizer files") from None


def _token_text(value):
    """tokenizer_config.json stores a token as "text" or as {"content": "text", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _parse_tokenizer_json(path):
    """tokenizer.json -> (vocab, merges, added tokens, pattern, nfc); refuses shapes we cannot reproduce."""
    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported; only byte-level BPE "
                         "(Qwen2 / GPT-2 style) can be loaded")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout", "byte_fallback", "ignore_merges"):
        if model.get(key):
            raise ValueError(f"{path}: BPE option {key}={model[key]!r} is not supported (Qwen2 leaves it unset)")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ValueError(f"{path}: normalizer {normalizer.get('type')!r} is not supported; expected NFC or none")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    split, byte_level = (steps + [{}, {}])[:2]
    if not (len(steps) == 2 and split.get("type") == "Split" and "Regex" in (split.get("pattern") or {})
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")):
        raise ValueError(f"{path}: pre_tokenizer {json.dumps(pre)[:300]} is not supported; expected Qwen2's "
                         "Sequence[Split(Regex, Isolated), ByteLevel(add_prefix_space=false, use_regex=false)]")
    # Merges are "a b" strings in older files and ["a", "b"] pairs in newer ones.
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    return model.get("vocab") or {}, merges, added, split["pattern"]["Regex"], normalizer is not None


def _read_vocab_merges(directory, config):
    """vocab.json + merges.txt (the slow Qwen2Tokenizer files); added tokens live in tokenizer_config.json."""
    vocab = _read_json(os.path.join(directory, "vocab.json"))
    merges = []
    with open(os.path.join(directory, "merges.txt"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or (n == 1 and line.startswith("#version")):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ValueError(f"{directory}/merges.txt line {n}: expected 'left right', got {line!r}")
            merges.append(pair)
    added = {t["content"]: {**t, "id": int(i)} for i, t in (config.get("added_tokens_decoder") or {}).items()}
    return vocab, merges, added, QWEN2_PATTERN, True


def _build_ranks(vocab, merges, where):
    """HF vocab + merges -> (tiktoken mergeable_ranks, rank_to_id or None, id_to_bytes)."""
    unicode_of = bytes_to_unicode()
    # Every character of a byte-level token stands for exactly one byte, so we translate all tokens at once
    # through a code point -> byte lookup table (numpy; ~10x faster than per-token str.translate on 151k tokens)
    # and cut the result at the tokens' cumulative lengths.
    byte_of = np.full(max(map(ord, unicode_of.values())) + 1, -1, dtype=np.int16)
    byte_of[[ord(c) for c in unicode_of.values()]] = list(unicode_of)
    tokens = list(vocab)
    codepoints = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype=np.uint32)
    raw = byte_of[np.minimum(codepoints, len(byte_of) - 1)]
    if (codepoints >= len(byte_of)).any() or (raw < 0).any():
        stray = sorted(set("".join(tokens)) - set(unicode_of.values()))
        raise ValueError(f"{where}: vocabulary has characters {stray[:5]} outside GPT-2's byte-level "
                         "alphabet; this is not a byte-level BPE vocabulary")
    raw = raw.astype(np.uint8).tobytes()
    ends = np.cumsum([len(t) for t in tokens]).tolist()
    id_to_bytes = {vocab[t]: raw[a:b] for t, a, b in zip(tokens, [0, *ends[:-1]], ends)}
    missing = [b for b in range(256) if unicode_of[b] not in vocab]
    if missing:
        raise ValueError(f"{where}: vocabulary lacks single-byte tokens for bytes {missing[:8]}; byte-level BPE "
                         "needs all 256 so that any text can be encoded")
    # rank order = merge order. Single bytes are never the result of a merge, so their ranks only need to be
    # unique; tiktoken compares ranks of merged pairs (>= 2 bytes) only.
    merged_ids = [vocab.get(left + right) for left, right in merges]  # comprehensions: 151k merges in ~0.1 s
    if None in merged_ids or not vocab.keys() >= {part for pair in merges for part in pair}:
        n = next(n for n, (a, b) in enumerate(merges) if a not in vocab or b not in vocab or a + b not in vocab)
        raise ValueError(f"{where}: merge #{n + 1} {merges[n]} uses a token missing from the vocabulary")
    if len(set(merged_ids)) < len(merged_ids):
        # Two merges producing the same token: tiktoken can rank a token only once, so keep its first merge.
        duplicates = len(merged_ids) - len(set(merged_ids))
        merged_ids = list(dict.fromkeys(merged_ids))
        warnings.warn(f"{where}: {duplicates} merges produce a token an earlier merge already produced; tiktoken "
                      "ranks each token once (by its first merge), so rare words may split differently from HF")
    byte_ids = [vocab[unicode_of[b]] for b in range(256)]
    if all(a < b for a, b in zip(merged_ids, merged_ids[1:])):
        # Ids are in merge order (Qwen2): the ids are valid ranks, no remapping needed.
        ranks = {id_to_bytes[i]: i for i in byte_ids + merged_ids}
        return ranks, None, id_to_bytes
    # Otherwise rank r = position in [256 bytes, merges in order] and rank_to_id[r] gives the HF id back.
    rank_to_id = byte_ids + merged_ids
    return {id_to_bytes[i]: r for r, i in enumerate(rank_to_id)}, rank_to_id, id_to_bytes


def load_tokenizer(path, default_system=QWEN_DEFAULT_SYSTEM) -> Tokenizer:
    """Build from a checkpoint directory: tokenizer.json, or vocab.json + merges.txt (+ tokenizer_config.json);
    a tokenizer_config.json with tokenizer_class "ByteTokenizer" gives byte_tokenizer()."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    files = {name: os.path.join(path, name) for name in ("tokenizer.json", "vocab.json", "merges.txt",
                                                         "tokenizer_config.json", "generation_config.json",
                                                         "config.json")}
    have = {name for name, p in files.items() if os.path.isfile(p)}
    config = _read_json(files["tokenizer_config.json"]) if "tokenizer_config.json" in have else {}
    if config.get("tokenizer_class") == "ByteTokenizer":
        return byte_tokenizer()
    if "tokenizer.json" in have:
        vocab, merges, added, pattern, nfc = _parse_tokenizer_json(files["tokenizer.json"])
    elif {"vocab.json", "merges.txt"} <= have:
        vocab, merges, added, pattern, nfc = _read_vocab_merges(path, config)
    else:
        raise FileNotFoundError(f"no tokenizer in {path!r}: looked for tokenizer.json, or vocab.json + merges.txt, "
                                "or tokenizer_config.json with tokenizer_class 'ByteTokenizer'")
    for text, spec in added.items():  # HF options we do not implement; Qwen never sets them
        if spec.get("lstrip") or spec.get("rstrip") or spec.get("single_word"):
            raise ValueError(f"{path}: added token {text!r} uses lstrip/rstrip/single_word, which is not supported")
    ranks, rank_to_id, id_to_bytes = _build_ranks(vocab, merges, path)
    special_tokens = {text: int(spec["id"]) for text, spec in added.items()}
    # eos: tokenizer_config.json first; else generation_config.json / config.json eos_token_id; else <|endoftext|>.
    model_eos = []
    for name in ("generation_config.json", "config.json"):
        if name in have and not model_eos:
            value = _read_json(files[name]).get("eos_token_id")
            model_eos = [int(v) for v in (value if isinstance(value, list) else [value] if value is not None else [])]
    id_to_text = {i: t for t, i in {**vocab, **special_tokens}.items()}
    eos = _token_text(config.get("eos_token")) or id_to_text.get(model_eos[0] if model_eos else None, "<|endoftext|>")
    pad = _token_text(config.get("pad_token")) or eos
    for text in (eos, pad):  # like HF, a named eos/pad that is not yet a token becomes a new added token
        if text not in special_tokens:
            special_tokens[text] = vocab[text] if text in vocab else max([*id_to_bytes, *special_tokens.values()]) + 1
    return Tokenizer(mergeable_ranks=ranks, rank_to_id=rank_to_id, id_to_bytes=id_to_bytes,
                     special_tokens=special_tokens, pattern=pattern, nfc=nfc, eos_token=eos, pad_token=pad,
                     stop_ids=[i for i in model_eos if i in id_to_text], default_system=default_system,
                     source_dir=path, config=config)
