"""A GGUF file's tokenizer: built by transformers from the file's metadata, split as llama.cpp splits
sentencepiece text, and kept on disk.

Building one parses the whole vocabulary and its merges (about 4.5 s for SmolLM2's 49,152 tokens here, on
every start of a server). The built tokenizer is saved once per file under
~/.cache/tokenmill/tokenizers/<key>/, and later processes load that folder in about 0.15 s.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ROOT = Path.home() / ".cache" / "tokenmill" / "tokenizers"
KEEP = 16  # folders kept, the most recently used first (a test run writes one per temporary GGUF file)


@functools.lru_cache(maxsize=4)
def load_gguf_tokenizer(path: str):
    """The tokenizer of the GGUF file at path, from the cache when this file has been seen before."""
    from transformers import AutoTokenizer

    folder = cache_folder(path)
    if folder.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            os.utime(folder)  # recently used: pruned last
            return tokenizer
        except Exception as e:  # a damaged folder: build again and replace it
            logger.warning("cached tokenizer %s did not load (%s); building it from %s again", folder, e, path)
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = build_gguf_tokenizer(path)
    _publish(tokenizer, folder)
    return tokenizer


def cache_folder(path: str) -> Path:
    """The file's folder in the cache: keyed by the file (path, size, modification time), this module's
    source and the versions of the libraries that build and save the tokenizer."""
    import tokenizers
    import transformers

    real = os.path.realpath(path)
    stat = os.stat(real)
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"{real} {stat.st_size} {stat.st_mtime_ns} {transformers.__version__} "
               f"{tokenizers.__version__}".encode())
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
    """Save into a folder of this process's own, then rename it into place, so that a concurrent process
    never loads a half-written tokenizer. A cache that cannot be written only costs the next start time."""
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:  # read-only home, a full disk, or another process published first
        logger.debug("tokenizer not cached in %s: %s", folder, e)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _prune()


def _prune() -> None:
    try:
        folders = sorted((p for p in CACHE_ROOT.iterdir() if not p.name.endswith(".tmp")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:  # a folder another process pruned meanwhile: its next publish prunes again
        return
    for old in folders[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
