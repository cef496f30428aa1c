"""A tiny random Llama teacher (head_dim 64, as vLLM's CPU attention needs) with the SmolLM2 tokenizer.

Its embedding matrix is padded past the tokenizer's vocabulary, and the padded rows of the output head
are made to dominate the logits, so any code that forgets to drop them is caught.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json")
PAD_ROWS = 64


def make_tiny_teacher(folder: Path, tokenizer_dir: Path, seed: int = 0, layers: int = 2) -> Path:
    # Deferred: tests/conftest.py imports this module for every test, most of which never need torch.
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    config = LlamaConfig(
        vocab_size=vocab + PAD_ROWS, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger output weights give peaked, teacher-like distributions instead of near-uniform ones.
        model.lm_head.weight.mul_(12.0)
        model.lm_head.weight[vocab:] = model.model.norm.weight.sign() * 5.0  # padded rows would win every top-k
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, folder / name)
    return folder
