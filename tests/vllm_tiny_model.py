"""Build a tiny random Llama with a locally trained tokenizer (no download), for the real-vLLM tests.

Run with the vLLM virtualenv's Python: ``python tests/vllm_tiny_model.py OUT_DIR``.
The weights are random (seeded): the model talks nonsense, which is all a test of
metering needs. Head size 32: vLLM's CPU attention backend takes 32, 64, 80, ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = (
    "the a battery cell stores energy charge power volt watt joule grid carbon solar wind hydro nuclear "
    "model token request server batch step prefill decode cache memory engine queue stream answer question "
    "please tell me about how why when where which what is are was were be been being have has had do does"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build(out: Path, seed: int = 0) -> Path:
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    special = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    # never stop early: the tests ask for exact token counts (ignore_eos) anyway
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}))
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
