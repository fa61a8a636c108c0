"""Sentencepiece tokenizers (Llama 2, TinyLlama, Mistral): from a GGUF and from a Hugging Face folder they
encode as sentencepiece does, and the engine streams exactly the text transformers decodes, byte-fallback
characters and leading spaces included. The vocabulary is trained here, by sentencepiece itself."""
import io
import os
import random

import pytest
import sentencepiece
import torch
import transformers
from gguf_files import write_llama_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.tokenization_utils_base import generate_merges

from tokenmill.engine import LLM, SamplingParams
from tokenmill.engine.sampling.detokenizer import IncrementalDetokenizer
from tokenmill.engine.weights import gguf_tokenizer
from tokenmill.engine.weights.gguf_tokenizer import load_gguf_tokenizer

gguf = pytest.importorskip("gguf")

CORPUS = [
    "Hello world, the answer is here.", "The quick brown fox jumps over the lazy dog.",
    "Streaming text must match the decode of the whole sequence.", "  Two spaces, a tab\tand a newline\n too.",
    "Numbers 12345 and café, naïve, résumé.", "Once upon a time there was a little model that could.",
]
# Characters outside the vocabulary (CJK, emoji, Hangul) fall back to one <0xNN> piece per UTF-8 byte.
TEXTS = ["Hello world 世界 😀 ok", "The lazy dog.\n\tIndented  twice", " leading space", "  two spaces first",
         "naïve café 12345", "a family 👨‍👩‍👧 and 한국어 text", "ends with a space "]
BOS, EOS = 1, 2


def train(add_dummy_prefix: bool = True) -> sentencepiece.SentencePieceProcessor:
    """A BPE model trained with Llama 2's tokenizer.model options, on a vocabulary of 400."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=add_dummy_prefix, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1, minloglevel=2)
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())


def add_sentencepiece_vocab(sp: sentencepiece.SentencePieceProcessor, add_space_prefix: bool = True):
    """The tokenizer keys llama.cpp's converter writes for a tokenizer.model."""

    def add(w: gguf.GGUFWriter) -> None:
        def token_type(i: int) -> gguf.TokenType:
            if sp.is_unknown(i):
                return gguf.TokenType.UNKNOWN
            if sp.is_control(i):
                return gguf.TokenType.CONTROL
            return gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL

        w.add_tokenizer_model("llama")
        w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
        w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
        w.add_token_types([token_type(i) for i in range(sp.vocab_size())])
        w.add_unk_token_id(sp.unk_id())
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_add_bos_token(True)
        w.add_add_space_prefix(add_space_prefix)

    return add


def tiny_llama(vocab_size: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sp():
    return train()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, sp) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    return write_llama_gguf(path, tiny_llama(sp.vocab_size()), add_sentencepiece_vocab(sp))


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_gguf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp) -> str:
    """A Hugging Face folder as transformers saves a Llama: config, safetensors, tokenizer.json and config."""
    path = str(tmp_path_factory.mktemp("hf"))
    tiny_llama(sp.vocab_size()).save_pretrained(path)
    pieces = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    transformers.LlamaTokenizer(vocab=pieces, merges=generate_merges(pieces, scores),
                                add_bos_token=True).save_pretrained(path)
    return path


def test_gguf_tokenizer_encodes_and_decodes_as_sentencepiece(sp, tok):
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [BOS, *ids]  # the file's add_bos_token
        assert tok.decode(ids) == sp.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(sp.encode("".join(TEXTS)))
    assert sum(p.startswith("<0x") for p in pieces) > 20  # byte fallback is exercised
    # As llama.cpp does, text after a special token starts a new run with its own "▁".
    assert tok.encode("</s>Hello", add_special_tokens=False) == [EOS, *sp.encode("Hello")]


def test_gguf_tokenizer_decodes_as_transformers_tokenizer_of_the_file(gguf_path, sp, tok):
    """transformers' own GGUF tokenizer is the decode oracle (it tokenizes " text" and text after a special
    token differently from sentencepiece, so it is not the encode oracle)."""
    oracle = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                        gguf_file=os.path.basename(gguf_path))
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(sp.vocab_size()) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip)
    for text in TEXTS:
        if not text.startswith(" "):
            assert tok.encode(text) == oracle.encode(text)


def test_gguf_without_space_prefix_encodes_and_decodes_as_sentencepiece_without_dummy_prefix(tmp_path):
    sp = train(add_dummy_prefix=False)
    path = write_llama_gguf(str(tmp_path / "no-prefix.gguf"), tiny_llama(sp.vocab_size()),
                            add_sentencepiece_vocab(sp, add_space_prefix=False))
    tok = load_gguf_tokenizer(path)
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == sp.decode(ids) == text


@pytest.mark.parametrize("add_space_prefix", [True, False])
def test_the_cached_tokenizer_encodes_and_decodes_as_sentencepiece(tmp_path, monkeypatch, add_space_prefix):
    """The sentencepiece splitting survives the tokenizer's round trip through the cache folder."""
    sp = train(add_dummy_prefix=add_space_prefix)
    path = write_llama_gguf(str(tmp_path / "tiny.gguf"), tiny_llama(sp.vocab_size()),
                            add_sentencepiece_vocab(sp, add_space_prefix=add_space_prefix))
    monkeypatch.setattr(gguf_tokenizer, "CACHE_ROOT", tmp_path / "cache")
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()
    gguf_tokenizer.load_gguf_tokenizer(path)  # built and saved
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()
    monkeypatch.setattr(gguf_tokenizer, "build_gguf_tokenizer", None)  # a second build would fail
    tok = gguf_tokenizer.load_gguf_tokenizer(path)
    gguf_tokenizer.load_gguf_tokenizer.cache_clear()
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [BOS, *ids]
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode("</s>Hello", add_special_tokens=False) == [EOS, *sp.encode("Hello")]


def stream(tok, prompt_ids: list[int], out_ids: list[int], chunks: list[int], **params) -> tuple[list[str], str]:
    """Feeds out_ids in chunks; returns the text after each chunk and the stop string (or None)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, SamplingParams(**params))
    texts, i = [], 0
    for n in chunks:
        stop = detok.append(out_ids[i:i + n])
        i += n
        texts.append(detok.output_text)
        if stop is not None:
            return texts, stop
    stop = detok.finish()
    texts.append(detok.output_text)
    return texts, stop


def decoded_after(tok, prompt_ids: list[int], out_ids: list[int], skip: bool) -> str:
    """What the output adds to the decode of the whole sequence: a first "▁" is a space after a prompt."""
    whole = tok.decode(prompt_ids + out_ids, skip_special_tokens=skip)
    prompt = tok.decode(prompt_ids, skip_special_tokens=skip)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


def test_first_piece_streams_its_space_after_a_prompt_and_not_at_the_start(sp, tok):
    ids = sp.encode("Hello world 世界 😀 ok")
    assert tok.convert_ids_to_tokens(ids[:1]) == ["▁He"]
    texts, _ = stream(tok, [], ids, [1] * len(ids))
    assert texts[0] == "He" and texts[-1] == tok.decode(ids) == "Hello world 世界 😀 ok"
    prompt = tok.encode("Say it:")
    texts, _ = stream(tok, prompt, ids, [1] * len(ids))
    assert texts[0] == " He" and texts[-1] == decoded_after(tok, prompt, ids, True) == " Hello world 世界 😀 ok"
    assert all("\ufffd" not in t for t in texts)  # a character split over <0xNN> pieces is held back whole


def test_output_after_a_prompt_ending_in_a_long_byte_run_keeps_its_leading_space(sp, tok):
    prompt = tok.encode("Say 世界😀")  # ends in ten <0xNN> pieces: the last five start inside 界
    out = sp.encode("ok then")
    texts, _ = stream(tok, prompt, out, [1] * len(out))
    assert texts[-1] == decoded_after(tok, prompt, out, True) == " ok then"


def char_starts(tok, ids: list[int]) -> list[int]:
    """Positions in ids where a character starts: not at a UTF-8 continuation byte piece (0x80..0xBF)."""
    pieces = tok.convert_ids_to_tokens(ids) + ["end"]
    return [k for k, p in enumerate(pieces) if not (p.startswith("<0x") and 0x80 <= int(p[3:5], 16) < 0xC0)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), skip=st.booleans())
def test_streamed_text_is_what_the_output_adds_to_the_decode_of_the_whole_sequence(sp, tok, data, skip):
    """Prompt and output hold whole characters (see the detokenizer's docstring for bytes that form none);
    the prompt's last ids may be byte pieces of one long run, which the output may continue."""
    ids = sp.encode(" ".join(TEXTS))
    starts = char_starts(tok, ids)
    begin, start, end = sorted(data.draw(st.lists(st.sampled_from(starts), min_size=3, max_size=3)))
    out = ids[start:end]
    for _ in range(data.draw(st.integers(0, 3))):  # sprinkle <unk>, <s>, </s> between characters
        out.insert(data.draw(st.sampled_from(char_starts(tok, out))), data.draw(st.sampled_from([0, BOS, EOS])))
    prompt = data.draw(st.sampled_from([[], [BOS], [BOS, *ids[begin:start]]]))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=len(out), max_size=len(out)))
    texts, _ = stream(tok, prompt, out, chunks, skip_special_tokens=skip)
    assert all(after.startswith(before) for before, after in zip(texts, texts[1:], strict=False))
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == decoded_after(tok, prompt, out, skip)


@pytest.mark.parametrize("stop", ["世界", "ok", "d 世"])
def test_stop_string_over_byte_fallback_pieces_stops_the_stream(sp, tok, stop):
    text = "Hello world 世界 😀 ok"
    ids = sp.encode(text)
    texts, got = stream(tok, tok.encode("Say:"), ids, [1] * len(ids), stop=[stop])
    assert got == stop and texts[-1] == " " + text[:text.index(stop)]


def engine_text_matches_decode(llm: LLM, sp) -> None:
    """The engine's prompt ids are sentencepiece's, and the streamed text is what its sampled ids add to the
    decode of the whole sequence. A regex keeps the random model's bytes to whole characters and makes it
    spell two that only byte pieces can."""
    tok, prompt = llm.get_tokenizer(), "Hello world"
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=40,
                            structured_outputs={"regex": "[a-z ]{1,8}世界 😀[a-z ]{1,8}"})
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.prompt_token_ids == [BOS, *sp.encode(prompt)]
    ids = out.outputs[0].token_ids
    assert sum(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids)) >= 7
    assert out.outputs[0].text == decoded_after(tok, out.prompt_token_ids, ids, True)
    assert "世界 😀" in out.outputs[0].text


def test_llm_from_gguf_streams_the_decode_of_its_tokens(gguf_path, sp):
    engine_text_matches_decode(LLM(gguf_path, dtype="float32", kv_cache_memory=8 << 20), sp)


def test_llm_from_hf_folder_streams_the_decode_of_its_tokens(hf_dir, sp):
    llm = LLM(hf_dir, dtype="float32", kv_cache_memory=8 << 20)
    for text in TEXTS:
        if not text.startswith(" "):  # transformers' Metaspace gives " text" one "▁" less than sentencepiece
            assert llm.get_tokenizer().encode(text, add_special_tokens=False) == sp.encode(text), text
    engine_text_matches_decode(llm, sp)
