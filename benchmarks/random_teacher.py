"""A teacher folder of a real model's shape with random weights and a byte-level tokenizer, made offline: for the
speed checks on machines that have neither the default teacher's GGUF nor a hub (benchmarks/gpu_check.sh).

    python benchmarks/random_teacher.py OUT [--shape llama-1b|smol-135m|tiny] [--dtype bfloat16]

Shapes: llama-1b is Llama-3.2-1B's (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocabulary 128256, tied
embeddings; 1.24B parameters), smol-135m SmolLM2-135M's (576, 30 layers, 9/3 heads, 1536, 49152), tiny a 2-layer
model for a CPU smoke run. The tokenizer encodes text as its UTF-8 bytes (ids 0-255, GPT-2's byte alphabet, no
merges); the other ids up to the vocabulary size exist but never come out of text, so a cache has the shape's
vocabulary. The output head is scaled up so the distributions are peaked like a trained model's rather than
near-uniform. Speed does not depend on the weights; these caches say nothing about quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_theta=500000.0),
    "smol-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=64, vocab_size=4096, tie_word_embeddings=False),
}


def byte_tokenizer(vocab: int):
    """A fast tokenizer with `vocab` ids whose first 256 are the bytes (GPT-2's byte-to-unicode alphabet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    table = {ch: i for i, ch in enumerate(alphabet)}
    table.update({f"<unused_{i}>": i for i in range(len(alphabet), vocab - 1)})
    table["<|endoftext|>"] = vocab - 1
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_random_teacher(out: Path, shape: str = "llama-1b", dtype: str = "bfloat16", seed: int = 0,
                        device: str = "cpu") -> Path:
    """Write the folder (config, safetensors weights, tokenizer) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    spec = SHAPES[shape]
    tokenizer = byte_tokenizer(spec["vocab_size"])
    config = LlamaConfig(**spec, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # peaked distributions, as a trained model gives
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is faster for 1B)")
    args = ap.parse_args()
    make_random_teacher(args.out, args.shape, args.dtype, device=args.device)
    print(f"{args.out}: random {args.shape} teacher ({args.dtype})")


if __name__ == "__main__":
    main()
