"""The GGUF tokenizer cache: a file's tokenizer is built once, saved, and loaded from the cache by later
processes with the same encoding, decoding, special tokens and chat template; a changed file, a damaged
folder or an unwritable cache only cost a build."""
import os
import shutil
import tempfile

import pytest

from tokenmill.engine.config import default_model_path
from tokenmill.engine.weights import gguf_tokenizer

TEXTS = ["Hello world!", "  two spaces\tand a tab\n", "<|im_start|>user\nhi<|im_end|>", "café 😀 12345",
         "def f(x):\n    return x ** 2"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_tokenizer, "CACHE_ROOT", tmp_path / "cache")
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()
    yield tmp_path / "cache"
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()


def _load_again(path: str):
    """As a new process would: nothing in memory."""
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()
    return gguf_tokenizer.load_gguf_tokenizer(path)


def _builds(monkeypatch, tokenizer=None) -> list[str]:
    """Counts builds; with a tokenizer, a build returns it (seconds saved where the build is not the point)."""
    built, build = [], gguf_tokenizer.build_gguf_tokenizer

    def counted(path):
        built.append(path)
        return build(path) if tokenizer is None else tokenizer

    monkeypatch.setattr(gguf_tokenizer, "build_gguf_tokenizer", counted)
    return built


def test_the_cached_tokenizer_is_the_built_one(cache, monkeypatch, tokenizer):
    path, built = default_model_path(), _builds(monkeypatch)
    first = gguf_tokenizer.load_gguf_tokenizer(path)
    assert gguf_tokenizer.load_gguf_tokenizer(path) is first  # in memory within a process
    cached = _load_again(path)
    assert built == [path] and cached is not first
    assert [p.name for p in cache.iterdir()] == [gguf_tokenizer.cache_folder(path).name]
    for tok in (first, cached):
        for text in TEXTS:
            ids = tokenizer.encode(text)
            assert tok.encode(text) == ids, text
            assert tok.decode(ids) == tokenizer.decode(ids)
            assert tok.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.all_special_tokens == tokenizer.all_special_tokens
        assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                  len(tokenizer))
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def _rename(path: str, name: bytes) -> None:
    data = bytearray(open(path, "rb").read())
    at = data.index(b"Smollm")
    data[at:at + len(name)] = name
    open(path, "wb").write(data)


def test_the_key_is_the_header_and_a_damaged_or_unwritable_cache_only_costs_a_build(cache, monkeypatch, tmp_path,
                                                                                      tokenizer):
    path = str(tmp_path / "model.gguf")
    shutil.copyfile(default_model_path(), path)
    os.utime(path, ns=(0, 0))
    assert gguf_tokenizer.cache_folder(path) == gguf_tokenizer.cache_folder(default_model_path())  # a copy
    built = _builds(monkeypatch, tokenizer)
    gguf_tokenizer.load_gguf_tokenizer(path)
    _rename(path, b"Smollm3")  # the model's name, in the metadata: another header
    assert gguf_tokenizer.cache_folder(path) != gguf_tokenizer.cache_folder(default_model_path())
    _load_again(path)
    assert len(built) == 2 and len(list(cache.iterdir())) == 2

    (gguf_tokenizer.cache_folder(path) / "tokenizer.json").write_text("{not json")
    assert _load_again(path).encode("Hello world!") == [19556, 905, 17]
    assert len(built) == 3
    _load_again(path)
    assert len(built) == 3  # the damaged folder was replaced

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    with monkeypatch.context() as m:  # a read-only cache is still read; what it lacks is built every time
        m.setattr(os, "utime", refuse)
        m.setattr(tempfile, "mkdtemp", refuse)
        _load_again(path)
        assert len(built) == 3
        _rename(path, b"Smollm4")
        _load_again(path)
        _load_again(path)
        assert len(built) == 5 and len(list(cache.iterdir())) == 2
    shutil.rmtree(cache)
    cache.write_text("a file where the cache folder should be")
    assert _load_again(path).decode([19556, 905, 17]) == "Hello world!"
    assert len(built) == 6


def test_only_the_most_recently_used_folders_are_kept(cache, monkeypatch, tokenizer):
    monkeypatch.setattr(gguf_tokenizer, "KEEP", 2)
    cache.mkdir()
    for i, name in enumerate(["old", "older"]):
        (cache / name).mkdir()
        os.utime(cache / name, (100 - i, 100 - i))
    _builds(monkeypatch, tokenizer)
    gguf_tokenizer.load_gguf_tokenizer(default_model_path())
    assert sorted(p.name for p in cache.iterdir()) == sorted(["old", gguf_tokenizer.cache_folder(
        default_model_path()).name])
