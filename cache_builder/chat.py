"""Chat masking: `messages` -> the conversation rendered with the teacher's chat template, its token ids, and a
loss mask that is 1 on tokens overlapping an assistant message's content.

The conversation is tokenized without special tokens (the template already wrote them). The end-of-turn
token is not part of the content and is not marked.
"""

from __future__ import annotations

import numpy as np

from cache_builder.documents import Document
from cache_builder.errors import BuildError


def encode_chat(doc: Document, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (T,) of the rendered conversation and its loss mask (T,): 1 on assistant content."""
    rendered, spans = assistant_spans(doc.messages, tokenizer, f"{doc.source}: record {doc.index}")
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (T, 2) characters
    mask = np.zeros(len(ids), dtype=np.uint8)
    for a, b in spans:  # a token belongs to the content if its characters overlap it
        mask |= ((offsets[:, 0] < b) & (offsets[:, 1] > a)).astype(np.uint8)
    return ids, mask


def assistant_spans(messages: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of assistant message contents.

    The conversation is rendered a second time with each assistant content replaced by a marker that
    no text contains; putting the contents back in place of the markers must give the real rendering,
    which proves the template copies the content verbatim and tells exactly where it went.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise BuildError(f"{where}: chat documents need a fast tokenizer (tokenizer.json) for character offsets")
    if getattr(tokenizer, "chat_template", None) is None:
        raise BuildError(f"{where}: the teacher's tokenizer has no chat template; cannot render 'messages'")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    marked = [dict(m) for m in messages]
    markers = {}
    for j, m in enumerate(marked):
        if m["role"] == "assistant" and m["content"]:
            markers[j] = f"\ue000kdcache-{j}\ue001"
            m["content"] = markers[j]
    template = tokenizer.apply_chat_template(marked, tokenize=False)
    for strip in (False, True):  # some templates trim message content
        spans, out, pos = [], [], 0
        for j, marker in markers.items():
            k = template.find(marker, pos)
            if k < 0:
                break
            content = messages[j]["content"].strip() if strip else messages[j]["content"]
            out.append(template[pos:k])
            start = sum(map(len, out))
            out.append(content)
            spans.append((start, start + len(content)))
            pos = k + len(marker)
        else:
            out.append(template[pos:])
            if "".join(out) == rendered:
                return rendered, spans
    raise BuildError(f"{where}: the chat template does not copy assistant messages verbatim; cannot mark "
                     "the assistant turns for the loss mask")
