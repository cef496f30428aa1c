"""A student with its own tokenizer, made here without a hub: a byte-level BPE trained with the `tokenizers` library on
the given texts, and a small random Llama over that vocabulary, saved as a Hugging Face folder. The cross-tokenizer
quality rows (benchmarks/quality_xtok.py) and tests use it."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's byte alphabet and pre-tokenizer, no BOS) with `vocab_size` entries, EOS included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def make_bpe_student(folder: Path, tokenizer, layers: int = 2, hidden: int = 64, heads: int = 2, seed: int = 0) -> Path:
    """`folder` holding `tokenizer` and a randomly initialised (seeded) Llama of `layers` x `hidden` over its vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
