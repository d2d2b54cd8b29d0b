"""Tokenizer tests: hand-worked BPE ids, the byte tokenizer, clear errors, and (when installed) exact id
agreement with Hugging Face `tokenizers` / `transformers` on a byte-level BPE trained here with Qwen2's
normalizer, pre-tokenizer and special tokens."""
import json
import random
import unicodedata

import pytest

from tokenizer import QWEN2_PATTERN, QWEN_DEFAULT_SYSTEM, byte_tokenizer, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Strings that exercise every branch of the pre-tokenizer and of the special-token split.
CORPUS = [
    "", "a", " ", "  ", "hello world", "Hello  World   ", "trailing space ", "tabs\tand\t\ttabs",
    "line1\r\nline2\r\n\r\nline3\n", "\n\n\n", "  leading", "I'LL don't we've You'RE it's", "'s'S'll",
    "1234567890", "3 + 44 = 47", "(25 - 3) * 4 / 2 = 44", "<answer> (1 + 2) * 3 </answer>", "x=10000000000000007",
    "café", "cafe\u0301", "e\u0301\u0301", "Å Å", "中文字符和日本語のテキスト", "한국어 텍스트", "emoji 😀👍🏽🇯🇵!",
    "def f(x):\n\treturn x**2  # square\r\n", "if (a&&b) { c += 1; }\n", "\u00a0nbsp\u3000ideographic\u2028sep",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b<|endoftext|>", "<|im_end|><|im_end|>",
    "<|im_en", "<|im_end|> trailing", "mixed 123abc ABC123 ½ ² ٣", "\x00\x01control\x7f", "?!?!... ---",
]

# Qwen2.5's chat template (as shipped in its tokenizer_config.json), used only as test data for the oracle.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are "
    "provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Using 3, 5, 7 make 22."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
]


def gpt2_byte_chars():
    """GPT-2's byte->char map written independently of tokenizer.py: printable Latin-1 bytes map to themselves,
    the rest to 256, 257, ... in byte order."""
    keep = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 255 and b != 173)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- no oracle needed: hand-worked ids

@pytest.fixture
def tiny_dir(tmp_path):
    """256 byte tokens at id = byte + 10, and merges whose ids are deliberately NOT in merge order."""
    char = gpt2_byte_chars()
    vocab = {char[b]: b + 10 for b in range(256)}
    merges = [("l", "o", 300), ("lo", "w", 299), ("Ġ", "l", 296), ("e", "r", 298), ("low", "er", 297),
              ("2", "0", 295)]
    for left, right, i in merges:
        vocab[left + right] = i
    write_json(tmp_path / "vocab.json", vocab)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b, _ in merges))
    write_json(tmp_path / "tokenizer_config.json", {
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(302 + k): {"content": s, "special": True} for k, s in enumerate(SPECIALS)}})
    return tmp_path


def test_hand_worked_ids(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    # "lower": l o w e r -> (l,o) -> (lo,w) -> (e,r) -> (low,er) = [297]; " lower" keeps Ġ apart because
    # (Ġ,l) is merge #3 but (l,o) is #1 and consumes the l first.
    assert tok.encode("lower lower") == [297, ord(" ") + 10, 297]
    # Merge order, not id order, decides: ranking by id would fuse (Ġ,l)=296 before (l,o)=300 -> [296, o].
    assert tok.encode(" lo") == [ord(" ") + 10, 300]
    assert tok.encode(" l") == [296]
    # \p{N} takes single digits, so the merge "2 0" can never apply inside a number.
    assert tok.encode("2024") == [ord(c) + 10 for c in "2024"]
    assert tok.encode("<|im_start|>lo<|im_end|>") == [303, 300, 304]
    assert tok.encode("é") == [0xC3 + 10, 0xA9 + 10] == tok.encode("e\u0301")  # NFC first, then UTF-8 bytes
    assert (tok.eos_id, tok.pad_id, tok.n_vocab, tok.is_instruct) == (304, 302, 305, True)
    assert tok.decode([297, 42, 296, 303]) == "lower  l<|im_start|>"  # 42 is " ", 296 is " l"
    assert tok.decode([0xE4 + 10]) == "\ufffd"  # a lone lead byte of a 3-byte character
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([3])  # ids 0..9 are holes in this vocabulary


def test_chat_template_hand_written(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.chat_template(msgs) == (f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
                                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat_template([{"role": "system", "content": "S"}, *msgs], add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")
    assert load_tokenizer(tiny_dir, default_system=None).chat_template(msgs) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="role"):
        tok.chat_template([{"role": "tool", "content": "x"}])


def test_save_round_trip(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    tok = load_tokenizer(tiny_dir)
    tok.save(out)
    again = load_tokenizer(out)
    text = "lower 2024 <|im_end|> é"
    assert again.encode(text) == tok.encode(text) and again.eos_id == tok.eos_id and again.n_vocab == tok.n_vocab


# ---------------------------------------------------------------- byte tokenizer

def test_byte_tokenizer(tmp_path):
    tok = byte_tokenizer()
    assert tok.n_vocab == 259 and tok.eos_id == tok.pad_id == 256 and tok.stop_ids == (256,)
    assert tok.special_tokens == {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    assert tok.encode("Hi 12") == [72, 105, 32, 49, 50]
    assert tok.encode("<|im_start|>é<|im_end|><|endoftext|>") == [257, 0xC3, 0xA9, 258, 256]
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)
        if "<|" not in s:  # without specials the ids are exactly the UTF-8 bytes of the NFC text
            assert tok.encode(s) == list(unicodedata.normalize("NFC", s).encode("utf-8"))
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"
    assert tok.chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "ByteTokenizer"
    assert load_tokenizer(tmp_path).encode("a<|im_end|>") == [97, 258]


# ---------------------------------------------------------------- errors

def test_clear_errors(tmp_path_factory, tiny_dir):
    tmp_path = tmp_path_factory.mktemp("empty")  # tiny_dir already lives in the function's tmp_path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json \\+ merges.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not valid JSON"):
        load_tokenizer(tmp_path)
    write_json(tmp_path / "tokenizer.json", {"model": {"type": "WordPiece", "vocab": {}}})
    with pytest.raises(ValueError, match="model type 'WordPiece' is not supported"):
        load_tokenizer(tmp_path)
    write_json(tmp_path / "tokenizer.json", {"model": {"type": "BPE", "vocab": {}, "merges": []},
                                             "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(ValueError, match="pre_tokenizer .* is not supported"):
        load_tokenizer(tmp_path)
    (tiny_dir / "merges.txt").write_text("l o\nq\n")
    with pytest.raises(ValueError, match="merges.txt line 2"):
        load_tokenizer(tiny_dir)
    with pytest.raises(TypeError):
        byte_tokenizer().encode([1, 2])


# ---------------------------------------------------------------- Hugging Face oracle

def fuzz_strings(n=300, seed=0):
    rng = random.Random(seed)
    parts = ["a", "b", "Z", " ", "  ", "\n", "\r\n", "\t", "7", "42", "90210", "'s", "'LL", "don't", "é", "e\u0301",
             "中文", "日本語", "😀", "👍🏽", "\u00a0", "\u3000", "!", "?!", ".", "(", ")", "\\", "Hello", "world", "the",
             "lower", "=", " +", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|im", "end|>", "ing", "tion"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Train a small byte-level BPE exactly shaped like Qwen2's and save it three ways."""
    tk = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    hf = tk.Tokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tk.Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(CORPUS * 20 + fuzz_strings(400, seed=1), trainer)
    hf.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    added = {str(hf.token_to_id(s)): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                      "normalized": False, "single_word": False} for s in SPECIALS}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": added, "clean_up_tokenization_spaces": False}
    fast, slow, shuffled = (tmp_path_factory.mktemp(name) for name in ("fast", "slow", "shuffled"))
    hf.save(str(fast / "tokenizer.json"))
    hf.model.save(str(slow))  # vocab.json + merges.txt, the slow-tokenizer files
    for d in (fast, slow):
        write_json(d / "tokenizer_config.json", config)
    # Same merges, but the merged tokens' ids permuted so that ids are no longer in merge order.
    vocab = json.loads((slow / "vocab.json").read_text(encoding="utf-8"))
    char = set(gpt2_byte_chars().values())
    merged = sorted((i for s, i in vocab.items() if s not in char))
    permuted = dict(zip(merged, random.Random(0).sample(merged, len(merged))))
    write_json(shuffled / "vocab.json", {s: permuted.get(i, i) for s, i in vocab.items()})
    (shuffled / "merges.txt").write_text((slow / "merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    write_json(shuffled / "tokenizer_config.json", config)
    return hf, fast, slow, shuffled


def hf_from_vocab_merges(directory, like):
    """An HF tokenizer with `like`'s pipeline but the vocab/merges in `directory` (ids possibly shuffled)."""
    import tokenizers
    from tokenizers import models
    hf = tokenizers.Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    hf.normalizer, hf.pre_tokenizer, hf.decoder = like.normalizer, like.pre_tokenizer, like.decoder
    hf.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return hf


def test_ids_match_hf_tokenizers(hf_dirs):
    hf, fast, slow, shuffled = hf_dirs
    texts = CORPUS + fuzz_strings()
    for directory, oracle in ((fast, hf), (slow, hf), (shuffled, hf_from_vocab_merges(shuffled, hf))):
        tok = load_tokenizer(directory)
        assert tok.n_vocab == oracle.get_vocab_size(with_added_tokens=True)
        assert tok.eos_id == oracle.token_to_id("<|endoftext|>") and not tok.is_instruct
        for s in texts:
            ids = tok.encode(s)
            assert ids == oracle.encode(s, add_special_tokens=False).ids, (directory.name, s)
            assert tok.decode(ids) == unicodedata.normalize("NFC", s)
            assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=False)
    # The shuffled copy really exercises the rank -> id remap, and ids differ from the unshuffled ones.
    assert load_tokenizer(shuffled)._rank_to_id is not None and load_tokenizer(fast)._rank_to_id is None
    assert load_tokenizer(shuffled).encode("hello world") != load_tokenizer(fast).encode("hello world")


def test_partial_utf8_decode_matches_hf(hf_dirs):
    hf, fast, _, _ = hf_dirs
    tok = load_tokenizer(fast)
    for s in ["😀👍🏽 中文", "日本語のテキスト", "é\u0301x"]:
        ids = tok.encode(s)
        for k in range(len(ids) + 1):  # every prefix, including ones that cut a character in half
            assert tok.decode(ids[:k]) == hf.decode(ids[:k], skip_special_tokens=False)


def test_ids_match_transformers(hf_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, fast, slow, _ = hf_dirs
    ours = load_tokenizer(fast)
    ours.save(tmp_path)  # a saved copy must load back in both our loader and transformers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    oracles = [transformers.PreTrainedTokenizerFast(tokenizer_file=str(fast / "tokenizer.json")),
               transformers.AutoTokenizer.from_pretrained(str(fast)),
               transformers.Qwen2Tokenizer.from_pretrained(str(slow)),  # built from vocab.json + merges.txt
               transformers.AutoTokenizer.from_pretrained(str(tmp_path))]
    reloaded = load_tokenizer(tmp_path)
    for oracle in oracles:
        for s in CORPUS + fuzz_strings(100, seed=2):
            expected = oracle.encode(s, add_special_tokens=False)
            assert ours.encode(s) == expected == reloaded.encode(s), (type(oracle).__name__, s)
    assert load_tokenizer(slow).eos_id == oracles[2].eos_token_id


def test_chat_template_matches_transformers(hf_dirs):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    _, fast, _, _ = hf_dirs
    ours, oracle = load_tokenizer(fast), transformers.PreTrainedTokenizerFast(tokenizer_file=str(fast / "tokenizer.json"))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = oracle.apply_chat_template(messages, chat_template=QWEN25_CHAT_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=gen)
            assert ours.chat_template(messages, add_generation_prompt=gen) == expected
            assert ours.encode(expected) == oracle.encode(expected, add_special_tokens=False)


def test_eos_from_generation_config(tiny_dir):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    del config["eos_token"]
    write_json(tiny_dir / "tokenizer_config.json", config)
    write_json(tiny_dir / "generation_config.json", {"eos_token_id": [304, 302]})
    tok = load_tokenizer(tiny_dir)
    assert tok.eos_id == 304 and tok.is_instruct and tok.stop_ids == (304, 302)
