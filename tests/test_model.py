"""Tests for model.py's transformer and sampler: each checks the fast path against a slower, obviously-correct one
(a full forward without cache, a naive argmax loop, a row run alone, the reference sampler, exact probabilities)."""
import dataclasses
import math
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from model import (PRESETS, KVCache, ModelConfig, StaticColumnCache, Transformer, generate, make_attention_mask,
                   next_token_logits, sample_next_token, sample_next_token_reference)

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, rope_theta=10000.0,
                   max_seq_len=64)


def tiny_model(dtype=torch.float32, seed=0, std=0.3, **overrides):
    """A tiny random model with large weights, so logits are peaked and greedy choices are far from ties."""
    torch.manual_seed(seed)
    model = Transformer(dataclasses.replace(TINY, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    return model.to(dtype).eval()


def tol(dtype):
    return dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------- config


def test_qwen25_3b_preset_has_3_085_938_688_parameters():
    with torch.device("meta"):
        model = Transformer(PRESETS["qwen2.5-3b"])
    assert sum(p.numel() for p in model.parameters()) == 3_085_938_688  # tied: the embedding counts once
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_hf_dict(name):
    assert ModelConfig.from_hf(PRESETS[name].to_hf()) == PRESETS[name]


@pytest.mark.parametrize("key,value", [("model_type", "llama"), ("use_sliding_window", True),
                                       ("rope_scaling", {"type": "yarn", "factor": 4.0}), ("hidden_act", "gelu"),
                                       ("rope_parameters", {"rope_type": "linear", "factor": 2.0})])
def test_from_hf_refuses_unsupported_configs_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf({**TINY.to_hf(), key: value})


# ---------------------------------------------------------------------------- forward, cache, padding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decoding_equals_full_forward(dtype):
    model = tiny_model(dtype)
    tokens = torch.randint(0, 97, (3, 12))
    full = model(tokens)                                             # (B, T, V) no cache
    cache = KVCache(model.config, 3, 16, "cpu", dtype)
    pieces = [model(tokens[:, :5], cache), model(tokens[:, 5:8], cache)]   # prefill, then a chunk of 3
    pieces += [model(tokens[:, t:t + 1], cache) for t in range(8, 12)]    # then one token at a time
    assert cache.length == 12 and cache.next_pos.tolist() == [12, 12, 12]
    torch.testing.assert_close(torch.cat(pieces, 1).float(), full.float(), **tol(dtype))


def test_causality_later_tokens_do_not_change_earlier_logits():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3  # and the change does reach the later positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_left_and_right_padding_leave_real_tokens_unchanged(dtype):
    """GRPO trains on rows of [left padding, prompt, completion, right padding]; real tokens must not notice."""
    model = tiny_model(dtype)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 12))
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    batch[0, 3:10], mask[0, 3:10] = a, 1   # 3 pads left, 2 pads right
    batch[1], mask[1] = b, 1
    logits = model(batch, attention_mask=mask)
    assert torch.isfinite(logits).all()  # padded query rows too
    torch.testing.assert_close(logits[0, 3:10].float(), model(a)[0].float(), **tol(dtype))
    torch.testing.assert_close(logits[1].float(), model(b)[0].float(), **tol(dtype))
    hidden = model.hidden_states(batch, attention_mask=mask)
    torch.testing.assert_close(model.lm_head(hidden), logits, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    tokens = torch.randint(0, 97, (2, 9))
    model(tokens).logsumexp(-1).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(tokens).logsumexp(-1).mean().backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- generate


def naive_greedy(model, prompt, n):
    """The obvious reference: re-run the full forward on the whole sequence for every new token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    return seq[len(prompt):]


PROMPTS = [[5, 17, 33], [9, 2, 71, 44, 13, 8, 60], [1]]


def test_greedy_generate_equals_naive_loop_with_padding_and_company():
    model = tiny_model()
    out = generate(model, PROMPTS, max_new_tokens=12, temperature=0)  # rows of different lengths: left-padded
    assert out == [naive_greedy(model, p, 12) for p in PROMPTS]
    assert generate(model, PROMPTS[1:2], 12, temperature=0) == out[1:2]  # alone == in company


def test_greedy_generate_bfloat16_picks_the_full_forward_argmax():
    model = tiny_model(torch.bfloat16)
    for prompt, new in zip(PROMPTS, generate(model, PROMPTS, 10, temperature=0)):
        logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].float()  # (10, V)
        chosen = logits.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        assert (chosen >= logits.max(-1).values - 0.1).all()  # argmax up to bf16 rounding of near-ties


def test_stop_ids_end_each_row_and_dropping_finished_rows_changes_nothing():
    model = tiny_model()
    prompts = [[3, 1, 4], [1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
    free = generate(model, prompts, 30, temperature=0)
    stop = {free[0][1], free[2][9]}  # rows stop at different steps, so the batch shrinks mid-generation
    cut = [next((row[:j + 1] for j, t in enumerate(row) if t in stop), row) for row in free]
    assert generate(model, prompts, 30, temperature=0, stop_ids=stop) == cut
    assert len(cut[0]) == 2 and cut[0][-1] in stop


def test_num_samples_rows_are_grouped_copies_of_their_prompt():
    model = tiny_model()
    out = generate(model, PROMPTS[:2], 8, temperature=0, num_samples=3)
    single = generate(model, PROMPTS[:2], 8, temperature=0)
    assert out == [single[0]] * 3 + [single[1]] * 3


def test_multi_sample_first_tokens_differ():
    """Regression (nanochat): the first token after prefill was once sampled once and broadcast to every row.
    With a near-uniform model over 97 ids, 16 identical first tokens has probability ~97**-15."""
    model = tiny_model(std=0.02)
    out = generate(model, [[1, 2, 3]], 4, temperature=1.0, num_samples=16, seed=0)
    assert len({row[0] for row in out}) > 1
    assert out == generate(model, [[1, 2, 3]], 4, temperature=1.0, num_samples=16, seed=0)  # seeded: repeatable


def test_vocab_limit_ids_are_never_sampled():
    model = tiny_model(std=0.02)
    out = generate(model, [[1, 2]], 20, temperature=2.0, num_samples=8, seed=1, vocab_limit=10)
    assert max(max(row) for row in out) < 10 and sum(map(len, out)) == 160
    logits = model(torch.tensor([[1, 2]]))[0, -1]
    assert generate(model, [[1, 2]], 1, temperature=0, vocab_limit=10)[0][0] == logits[:10].argmax().item()


@pytest.mark.parametrize("temperature,top_p,vocab_limit", [(0.7, 1.0, None), (1.3, 0.9, 50)])
def test_generate_samples_each_token_with_sample_next_token_on_the_full_forward_logits(temperature, top_p, vocab_limit):
    """Replay: every token generate() returns is what sample_next_token draws, with generate's seeded generator, from
    the logits of a plain full forward over prompt + tokens so far (cut to vocab_limit), row after row in order."""
    model = tiny_model()
    out = generate(model, PROMPTS[:2], 6, temperature=temperature, top_p=top_p, seed=3, vocab_limit=vocab_limit,
                   num_samples=2)
    assert [len(row) for row in out] == [6] * 4
    rows = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # the documented layout: prompt 0's samples first
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        logits = torch.stack([model(torch.tensor([p + new[:step]]))[0, -1, :vocab_limit] for p, new in zip(rows, out)])
        replay = sample_next_token(logits, gen, temperature, top_p)
        assert replay.tolist() == [new[step] for new in out]


def test_generate_restores_train_mode_and_rejects_bad_input():
    model = tiny_model().train()
    generate(model, [[1]], 2)
    assert model.training
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], 10)
    with pytest.raises(ValueError):
        generate(model, [[]], 2)


def test_sample_next_token_top_p_and_temperature():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, gen, 0, 0.5).tolist() == [0] * 4000  # temperature 0: argmax
    # top_p 0.7: {0, 1} already hold 0.8 >= 0.7, so tokens 2 and 3 go; renormalised 0.5/0.8 = 0.625 for token 0
    counts = torch.bincount(sample_next_token(logits, gen, 1.0, 0.7), minlength=4)
    assert counts[2:].sum() == 0 and abs(counts[0] / 4000 - 0.625) < 0.03
    counts = torch.bincount(sample_next_token(logits, gen, 1.0, 0.81), minlength=4)
    assert counts[3] == 0 and counts[2] > 0
    counts = torch.bincount(sample_next_token(logits, gen, 1.0, 1.0), minlength=4)  # plain sampling
    assert torch.allclose(counts / 4000, probs[0], atol=0.03)
    # temperature 2 flattens: p ~ sqrt(p) renormalised
    flat = probs[0].sqrt() / probs[0].sqrt().sum()
    counts = torch.bincount(sample_next_token(logits, gen, 2.0, 1.0), minlength=4)
    assert torch.allclose(counts / 4000, flat, atol=0.03) and not math.isclose(flat[0], 0.5, abs_tol=0.05)


def exact_probs(logits, temperature, top_p, rule="above"):
    """Worked in float64: softmax(logits / temperature), top-p, renormalised. rule "above" (the right one): drop a
    token when the tokens ranked above it already hold >= top_p; "self" (an off-by-one): when it and those do."""
    p = torch.softmax(logits.double() / temperature, -1)
    ranked, order = p.sort(-1, descending=True)
    mass = ranked.cumsum(-1) - (ranked if rule == "above" else 0)
    ranked = torch.where(mass >= top_p, 0.0, ranked)
    return torch.zeros_like(p).scatter(-1, order, ranked / ranked.sum(-1, keepdim=True).clamp(min=1e-30))


def chi_square(counts, probs, kept):
    """Pearson's statistic of observed counts (R, V) against probabilities (R, V), over the ids in `kept`."""
    expected = counts.sum(-1, keepdim=True) * probs
    return ((counts - expected)[kept] ** 2 / expected[kept].clamp(min=1e-12)).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_fast_and_reference_samplers_match_the_exact_distribution(temperature, top_p):
    """20,000 draws per row on an 8-id vocabulary: both samplers' frequencies fit the exact probabilities and never
    hit a dropped id, while the other temperature or the off-by-one top-p rule would be far off."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0],
                           [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4],     # near uniform
                           [4.0, 3.9, 0.0, -1.0, -2.0, -2.0, -5.0, -9.0]])  # two tokens hold almost all mass
    n = 20000
    want = exact_probs(logits, temperature, top_p)                        # (3, 8)
    wrong = [exact_probs(logits, {1.0: 0.7, 0.7: 1.0}[temperature], top_p)]
    if top_p < 1.0:
        wrong.append(exact_probs(logits, temperature, top_p, rule="self"))
    for sampler in (sample_next_token, sample_next_token_reference):
        ids = sampler(logits.repeat_interleave(n, 0), torch.Generator().manual_seed(0), temperature, top_p)
        counts = torch.stack([torch.bincount(row, minlength=8) for row in ids.view(3, n)]).double()  # (3, 8)
        assert (counts[want == 0] == 0).all(), sampler.__name__
        assert chi_square(counts, want, want > 0) < 60, sampler.__name__  # <= 21 dof: P(chi2 > 60) ~ 1e-5
        assert all(chi_square(counts, w, want > 0) > 200 for w in wrong), sampler.__name__


def test_sample_next_token_temperature_zero_is_argmax_for_both_samplers():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    for sampler in (sample_next_token, sample_next_token_reference):
        assert torch.equal(sampler(logits, None, 0, 0.5), logits.argmax(-1))


def test_attention_mask_cases():
    cache = KVCache(TINY, 2, 8, "cpu", torch.float32)
    assert make_attention_mask(None, None, 5, "cpu") == (None, True)      # no padding, no prefix: causal kernel
    assert make_attention_mask(None, None, 1, "cpu") == (None, False)
    cache.length = 3                                                     # as after a 3-token unpadded prefill
    assert make_attention_mask(None, cache, 1, "cpu") == (None, False)   # plain decoding: sees every cached key
    attn_mask, is_causal = make_attention_mask(None, cache, 2, "cpu")     # two new tokens after a prefix
    assert not is_causal and attn_mask.shape == (2, 1, 2, 5)
    assert attn_mask[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]
    mask = torch.tensor([[False, True, True], [False, False, False]])    # row 1 is pure padding
    attn_mask, _ = make_attention_mask(mask, None, 3, "cpu")
    assert attn_mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert attn_mask[1, 0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]  # own key


def test_inverse_cdf_matches_a_full_cumsum_and_never_picks_zero_mass():
    """The two-level inverse CDF (blocks, then ids inside the block) must pick the same id as one float64
    cumsum over the whole vocabulary, and never an id of zero probability (masked or padded ids)."""
    from model import inverse_cdf
    gen = torch.Generator().manual_seed(0)
    for V, block in [(5000, 1024), (1024, 1024), (3, 1024), (2500, 7)]:
        probs = torch.rand(64, V, generator=gen) ** 8                   # spread-out masses
        probs[:, torch.rand(V, generator=gen) < 0.3] = 0.0              # zero-mass ids anywhere
        probs[:, -1] = 0.0                                              # and at the very end (like vocab_limit)
        probs[:, 0] += 1e-3                                             # keep every row non-empty
        u = torch.rand(64, 1, generator=gen, dtype=torch.float64)
        u[0], u[1] = 0.0, 1.0 - 2 ** -53                                # the extremes
        cdf = probs.double().cumsum(-1)
        expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=V - 1)
        got = inverse_cdf(probs, u, block=block)
        assert (probs.gather(-1, got) > 0).all()
        assert (got == expected).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_logits_blocked_product_equals_the_reference_matmul(dtype):
    # The CPU path multiplies in blocks of 2,048 vocabulary rows; the reference (the non-CPU branch) is one
    # F.linear over the kept rows. 5000 and 4500 are not multiples of 2048, so the last block is partial.
    config = ModelConfig(vocab_size=5000, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64)
    torch.manual_seed(0)
    model = Transformer(config).to(dtype)
    h = torch.randn(3, 32, dtype=dtype)
    for vocab_limit in (None, 4500, 2048, 100):
        logits = next_token_logits(model, h, vocab_limit)
        expected = F.linear(h, model.lm_head.weight[:vocab_limit]).float()
        assert logits.dtype == torch.float32 and logits.shape == (3, vocab_limit or 5000)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(logits, expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------- static-shape decode (compilable)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_static_decode_gives_the_eager_loops_tokens(temperature, top_p):
    """Ragged prompts, several samples, rows ending at different steps (so the eager loop drops rows mid-way):
    the fixed-shape loop gives the same tokens for the same seed."""
    model = tiny_model(std=0.5)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [6, 5]]
    kw = dict(temperature=temperature, top_p=top_p, seed=7, num_samples=3)
    free = generate(model, prompts, 24, **kw)
    stop = {free[0][3], free[3][9], free[6][12]}  # rows end at several steps, so the eager loop drops some
    eager = generate(model, prompts, 24, stop_ids=stop, **kw)
    assert len(set(map(len, eager))) > 2 and min(map(len, eager)) < 24
    sizes, use_rows = [], StaticColumnCache.use_rows
    with patch.object(StaticColumnCache, "use_rows", lambda cache, B: (sizes.append(B), use_rows(cache, B))):
        assert generate(model, prompts, 24, stop_ids=stop, decode="static", **kw) == eager
    assert sizes[0] == 9 and all(n in (1, 2, 4, 8) for n in sizes[1:]) and len(sizes) > 1  # cut to powers of two


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_batch_sampled_in_parts_gives_the_samples_of_the_whole(decode):
    """batch_rows, the torchrun split: the batch's rows sampled in three calls (each with its own prompts, so
    other padding, and rows ending at other steps) are the rows of one call on the whole batch, for the same
    seed; without batch_rows the parts draw other uniforms and differ."""
    model = tiny_model(std=0.5)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [6, 5], [2, 7]]
    kw = dict(temperature=0.9, top_p=0.95, seed=11, num_samples=2, decode=decode)
    free = generate(model, prompts, 20, **kw)
    stop = {free[0][2], free[3][6], free[5][10]}
    whole = generate(model, prompts, 20, stop_ids=stop, **kw)
    assert len(set(map(len, whole))) > 2  # rows end at several steps, so the eager loop drops some mid-way
    parts = [generate(model, prompts[a:b], 20, stop_ids=stop, batch_rows=(2 * a, 8), **kw)
             for a, b in ((0, 1), (1, 3), (3, 4))]
    assert parts[0] + parts[1] + parts[2] == whole
    assert generate(model, prompts[1:3], 20, stop_ids=stop, **kw) != whole[2:6]
    with pytest.raises(ValueError, match="batch_rows"):
        generate(model, prompts[1:3], 20, batch_rows=(6, 8), **kw)


class InPlaceWrites(TorchDispatchMode):
    """Every tensor an op writes in place (its schema marks the argument as written), while the mode is on."""

    def __init__(self):
        super().__init__()
        self.written = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self.written.append(value)
        return func(*args, **kwargs)


def test_the_decode_step_writes_only_static_addresses_kept_from_call_to_call():
    """What CUDA graphs need of the compiled step (mode="reduce-overhead"; no GPU here, so checked on the eager step
    it compiles): CUDA graph trees run a graph without CUDA graphs when it writes in place into an input not marked
    as a static address, and record it again when a static address moves. So every tensor a decode step writes
    (the cache's columns, the column, the positions) must be marked static, also after the batch is cut to fewer
    rows, and a second generate call, with another batch size, must write the same memory as the first, and no new
    cache be made."""
    import model as model_module
    from torch._dynamo.utils import get_static_address_type
    model = tiny_model(max_seq_len=128)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [2, 7]]
    free = generate(model, prompts, 20, seed=0, num_samples=4)
    stop = {free[0][2], free[5][6]}  # rows end early, so the static loop cuts the batch (to 8, 4, ... rows)
    step, writes, sizes, use_rows = model_module.decode_step, [], [], StaticColumnCache.use_rows

    def watched_step(model, token, cache, *args):
        inputs = [token, *cache.keys, *cache.values, cache.key_mask, cache.next_pos, cache.column, *model.parameters()]
        with InPlaceWrites() as mode:
            logits = step(model, token, cache, *args)
        storage = {t.untyped_storage().data_ptr() for t in inputs}  # (tensors the step makes may be written)
        writes.append([t for t in mode.written if t.untyped_storage().data_ptr() in storage])
        return logits
    model_module.free_decode_buffers()
    with patch.object(model_module, "decode_step", watched_step), \
            patch.object(StaticColumnCache, "use_rows", lambda cache, B: (sizes.append(B), use_rows(cache, B))):
        generate(model, prompts, 20, seed=0, num_samples=4, stop_ids=stop, decode="static")
        first_call, buffers = writes[:], model_module._decode_buffers
        writes.clear()
        generate(model, prompts[:2], 30, seed=1, num_samples=3, decode="static")
    assert sizes[0] == 12 and min(sizes) < 12 and sizes[-1] == 6 and len(first_call) > 8 and len(writes) == 29
    for step_writes in first_call + writes:
        assert len(step_writes) == 2 * model.config.n_layers + 2  # keys and values of every layer, column, positions
        assert all(get_static_address_type(t) is not None for t in step_writes)
    memory = lambda calls: {t.untyped_storage().data_ptr() for step_writes in calls for t in step_writes}
    assert memory(writes) == memory(first_call) and model_module._decode_buffers is buffers


def test_compiled_decode_step_equals_the_eager_step_and_generate():
    """torch.compile(fullgraph=True, dynamic=True) of the one-token step (the CPU's C++ compiler builds it): generate's
    tokens the eager loop's, greedy and sampled, over 70 new tokens (the cache read through a 64-column window, then
    a 128-column one: one graph for both), and the compiled step's logits within 1e-5 of a full forward at every
    step."""
    import model as model_module
    from torch._dynamo.utils import counters
    from model import window_width
    model = tiny_model(std=0.1, max_seq_len=128)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    widths, window_width_of = [], model_module.window_width
    torch._dynamo.reset()  # compiled anew here, so its graphs can be counted
    graphs = counters["stats"]["unique_graphs"]
    with patch.object(model_module, "window_width", lambda *a: widths.append(window_width_of(*a)) or widths[-1]):
        compiled = generate(model, prompts, 70, temperature=1.0, seed=2, num_samples=2, decode="compiled")
    assert compiled == generate(model, prompts, 70, temperature=1.0, seed=2, num_samples=2)
    assert widths == [64] * 59 + [128] * 10  # columns 5..63 through a 64-column window, then 64..73
    assert counters["stats"]["unique_graphs"] - graphs == 1
    # greedy at the same batch shape as the sampled call (4 rows): the same compiled step, no second compile
    assert generate(model, prompts, 70, temperature=0.0, num_samples=2, decode="compiled") == \
        generate(model, prompts, 70, temperature=0.0, num_samples=2)
    # the logits of each step against a full forward over the prompt and the tokens so far (left padding masked)
    step = model_module._compiled_decode_step
    tokens = torch.tensor([[0, 0, 3, 1, 4], [1, 5, 9, 2, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    cache = KVCache(model.config, 2, 128, "cpu", torch.float32)
    with torch.no_grad():
        model.hidden_states(tokens, cache, mask)
        static = StaticColumnCache(model.config, cache, torch.arange(2), 128)
        for new in range(64):
            token = torch.tensor([(new * 7) % 97, (new * 13 + 5) % 97])
            tokens, mask = torch.cat([tokens, token[:, None]], 1), torch.cat([mask, torch.ones(2, 1).bool()], 1)
            logits = step(model, token, static, None, window_width(5 + new, 128))
            if new % 8 == 0 or new > 56:  # the full forwards, past the window's edge at column 64 among them
                full = model(tokens, attention_mask=mask)[:, -1].float()
                assert torch.allclose(logits.log_softmax(-1), full.log_softmax(-1), atol=1e-5, rtol=0)


def test_compiled_blocks_give_the_eager_forward_and_gradients():
    """--compile (model.compile_blocks): the training forward and backward through torch.compile'd blocks, with and
    without a padding mask, at two shapes and with gradient checkpointing, against the eager blocks: hidden states
    to 1e-5, every gradient to 1e-5 of its norm."""
    model = tiny_model(std=0.1).train()
    weights = torch.linspace(-1, 1, TINY.dim)

    def forward_backward(compiled, tokens, mask, checkpointing):
        model.compile_blocks, model.gradient_checkpointing = compiled, checkpointing
        model.zero_grad(set_to_none=True)
        hidden = model.hidden_states(tokens, attention_mask=mask)                      # (B, T, C)
        (hidden.pow(2) * weights).sum().backward()
        return hidden.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    import model as model_module
    calls, compiled_block = [], model_module.compiled_block

    def counted():  # the compiled block, each call counted: the comparison is of the compiled path
        block = compiled_block()
        return lambda *args: (calls.append(1), block(*args))[1]
    torch.manual_seed(1)
    left_padded = torch.ones(3, 9, dtype=torch.bool)
    left_padded[0, :4] = left_padded[1, :1] = False
    for tokens, mask, checkpointing in [(torch.randint(0, 97, (3, 7)), None, False),
                                        (torch.randint(0, 97, (2, 12)), None, True),
                                        (torch.randint(0, 97, (3, 9)), left_padded, False)]:
        hidden, grads = forward_backward(False, tokens, mask, checkpointing)
        assert not calls
        with patch.object(model_module, "compiled_block", counted):
            hidden_c, grads_c = forward_backward(True, tokens, mask, checkpointing)
        assert len(calls) >= TINY.n_layers  # every layer (and again in a checkpointed backward's recompute)
        calls.clear()
        assert torch.allclose(hidden_c, hidden, atol=1e-5, rtol=0)
        for name, grad in grads.items():
            assert (grads_c[name] - grad).norm() <= 1e-5 * grad.norm() + 1e-8, name
