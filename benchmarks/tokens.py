"""Token counting fallback for servers that do not report usage in their stream."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def load_token_counter(path: str) -> Callable[[str], int]:
    """A `text -> token count` function from a Hugging Face tokenizer folder or a GGUF
    file (whose embedded tokenizer transformers can read). Special tokens are not added:
    only the text itself is counted."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is asked for

    p = Path(path)
    if p.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(p))
    return lambda text: len(tok.encode(text, add_special_tokens=False))
