"""A GGUF file's tokenizer: built by transformers from the file's metadata, split as llama.cpp splits
sentencepiece text, and kept on disk.

Building one parses the whole vocabulary and its merges (about 4.5 s for SmolLM2's 49,152 tokens here, on
every start of a server). The built tokenizer is saved once per file under
~/.cache/tokenmill/tokenizers/<key>/, and later processes load that folder in about 0.15 s.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ROOT = Path.home() / ".cache" / "tokenmill" / "tokenizers"
KEEP = 16  # folders kept, the most recently used first


@functools.lru_cache(maxsize=4)
def load_gguf_tokenizer(path: str):
    """The tokenizer of the GGUF file at path, from the cache when this file has been seen before."""
    from transformers import AutoTokenizer

    folder = cache_folder(path)
    if folder.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a damaged folder: build again and replace it
            logger.warning("cached tokenizer %s did not load (%s); building it from %s again", folder, e, path)
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # a read-only cache is still used
                os.utime(folder)  # recently used: pruned last
            return tokenizer
    tokenizer = build_gguf_tokenizer(path)
    _publish(tokenizer, folder)
    return tokenizer


def cache_folder(path: str) -> Path:
    """The file's folder in the cache, keyed by what its tokenizer is made of: the file's header (the
    metadata, not the weights, so a copy elsewhere shares it), the tokenizer files transformers also reads
    beside the file, the code that builds it and the versions of the libraries that build and save it."""
    import tokenizers
    import transformers

    from tokenmill.engine.weights import gguf_reader

    key = hashlib.sha256()
    with open(path, "rb") as f:
        key.update(f.read(gguf_reader.GGUFReader(path).data_offset))
    folder = Path(os.path.abspath(path)).parent
    for file in (folder / "tokenizer_config.json", folder / "chat_template.jinja"):
        if file.is_file():
            key.update(file.name.encode() + file.read_bytes())
    for source in (Path(__file__), Path(gguf_reader.__file__)):
        key.update(source.read_bytes())
    key.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    return CACHE_ROOT / key.hexdigest()[:16]


def build_gguf_tokenizer(path: str):
    """transformers' tokenizer of the file, with sentencepiece splitting where the file is sentencepiece's."""
    from transformers import AutoTokenizer

    from tokenmill.engine.weights.gguf_reader import GGUFReader

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                              gguf_file=os.path.basename(path))
    fields = GGUFReader(path).fields
    if fields["tokenizer.ggml.model"] == "llama":  # sentencepiece (Llama 2, TinyLlama, Mistral)
        _split_as_sentencepiece(tokenizer, add_dummy_prefix=fields.get("tokenizer.ggml.add_space_prefix", True))
    return tokenizer


def _split_as_sentencepiece(tokenizer, add_dummy_prefix: bool) -> None:
    """Encode as sentencepiece and llama.cpp do: "▁" before each run of text, after a special token too and
    even where the text starts with a space. transformers' Metaspace adds it only before the first run, and
    not before a space, which gives other ids for "<s>[INST] ..." and " text" than the model was trained on.
    Decoding is unchanged, but without the dummy prefix no leading space is stripped either."""
    from tokenizers import decoders, normalizers

    backend = tokenizer.backend_tokenizer
    spaces = normalizers.Replace(" ", "\u2581")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if add_dummy_prefix else spaces
    backend.pre_tokenizer = None
    if not add_dummy_prefix:
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])


def _publish(tokenizer, folder: Path) -> None:
    """Save into a folder of this call's own, then rename it into place, so that a concurrent process
    never loads a half-written tokenizer. A cache that cannot be written only costs the next start time."""
    tmp = None
    try:
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=folder.name, suffix=".tmp", dir=CACHE_ROOT)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except Exception as e:  # read-only home, a full disk, another process published first, a failed save
        logger.debug("tokenizer not cached in %s: %s", folder, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    _prune()


def _prune() -> None:
    """Keep the KEEP most recently used folders, and no half-written one older than an hour (its process
    was killed mid-save)."""
    try:
        entries = [(p, p.stat().st_mtime) for p in CACHE_ROOT.iterdir()]
    except OSError:  # a folder another process pruned meanwhile: its next publish prunes again
        return
    stale = [p for p, mtime in entries if p.name.endswith(".tmp") and mtime < time.time() - 3600]
    done = sorted((e for e in entries if not e[0].name.endswith(".tmp")), key=lambda e: e[1], reverse=True)
    for old in stale + [p for p, _ in done[KEEP:]]:
        shutil.rmtree(old, ignore_errors=True)
