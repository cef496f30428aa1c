"""The manifest's `tokenizer` section: what decides whether two tokenizers give the same ids.

Builders record it and trainers compare a student's tokenizer with it, so it lives with the format.
"""

from __future__ import annotations

import hashlib
import json


def tokenizer_info(tokenizer) -> dict:
    """Fingerprint (sha256 over the vocabulary sorted by id and the special ids), real vocabulary size
    (`len(tokenizer)`, which can be smaller than a model's padded embedding) and special ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    h = hashlib.sha256(json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode())
    return {"fingerprint": h.hexdigest(), "vocab_size": len(tokenizer), "special_ids": special,
            "class": type(tokenizer).__name__}
