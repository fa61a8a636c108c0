"""IncrementalDetokenizer: streamed text is UTF-8 safe, never retracted, and stops on stop strings."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.engine.sampling.detokenizer import IncrementalDetokenizer
from tokenmill.engine.sampling.sampling_params import SamplingParams

TEXT = (
    "Hello there! Here's a mix: 😀 smile, 👍🏽 thumbs, family 👨‍👩‍👧‍👦, flag 🇫🇷. "
    "中文：你好世界，今天天气很好。日本語：こんにちは、世界！한국어: 안녕하세요. "
    "Accents: café, naïve, Ærøskøbing, Ελληνικά, русский, العربية.\n"
    "def f(x):\n    return x ** 2  # squares 🐍\n"
    "Math ∑∫√∞ ≠ ≤, arrows → ⇒, and the end. END OF ANSWER, then more text 🎉🎉."
)


def stream(tokenizer, out_ids, prompt_ids=(), chunks=None, **params):
    """Feed out_ids (one at a time, or in the given chunk sizes); return (detok, texts after each step, stop)."""
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), SamplingParams(**params))
    sizes = chunks or [1] * len(out_ids)
    texts, stop, i = [], None, 0
    for n in sizes:
        stop = detok.append(out_ids[i:i + n])
        i += n
        texts.append(detok.output_text)
        if stop is not None:
            return detok, texts, stop
    stop = detok.finish()
    texts.append(detok.output_text)
    return detok, texts, stop


def assert_never_retracted(texts):
    for before, after in zip(texts, texts[1:], strict=False):
        assert after.startswith(before), (before, after)


def test_emoji_and_cjk_split_across_tokens_stream_exactly(tokenizer):
    prompt = tokenizer.encode("Repeat after me.\n", add_special_tokens=False)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # The text really does split characters across tokens, so this exercises the UTF-8 hold.
    assert sum(tokenizer.decode([i]).endswith("\ufffd") for i in ids) > 10
    _, texts, _ = stream(tokenizer, ids, prompt)
    assert all("\ufffd" not in t for t in texts)
    assert_never_retracted(texts)
    assert texts[-1] == tokenizer.decode(ids) == TEXT


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), skip_special=st.booleans())
def test_final_text_equals_full_decode_on_random_token_slices(tokenizer, data, skip_special):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    start = data.draw(st.integers(0, len(ids) - 1))  # may start mid-character
    end = data.draw(st.integers(start + 1, len(ids)))
    out = list(ids[start:end])
    for _ in range(data.draw(st.integers(0, 3))):  # sprinkle special tokens (<|im_end|>, <file_sep>, ...)
        out.insert(data.draw(st.integers(0, len(out))), data.draw(st.sampled_from([0, 1, 2, 5])))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=len(out), max_size=len(out)))
    _, texts, _ = stream(tokenizer, out, ids[max(0, start - 20):start], chunks,
                         skip_special_tokens=skip_special)
    assert_never_retracted(texts)
    assert texts[-1] == tokenizer.decode(out, skip_special_tokens=skip_special)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_several_tokens_truncates_and_returns_it(tokenizer, include):
    stop = "END OF ANS"  # ends mid-token ("ANSWER"): the rest of that token must be dropped
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(tokenizer.encode(" " + stop, add_special_tokens=False)) >= 3
    detok, texts, got = stream(tokenizer, ids, stop=[stop], include_stop_str_in_output=include)
    head = TEXT[:TEXT.index(stop)]
    assert got == stop
    assert detok.output_text == (head + stop if include else head)
    assert len(texts) < len(ids)  # stopped on the token completing the stop string
    assert_never_retracted(texts)
    with pytest.raises(RuntimeError):
        detok.append(ids[len(texts):])


def test_stop_string_inside_a_split_emoji_waits_for_the_whole_character(tokenizer):
    ids = tokenizer.encode("one 😀 two", add_special_tokens=False)
    detok, texts, got = stream(tokenizer, ids, stop=["😀"])
    assert got == "😀" and detok.output_text == "one "
    assert all("\ufffd" not in t for t in texts)


def test_earliest_stop_wins_and_partial_match_is_released_on_finish(tokenizer):
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    _, _, got = stream(tokenizer, ids, stop=["delta", "beta"])
    assert got == "beta"
    # "gamma del" is a proper prefix of the stop: held back, then released by finish().
    ids = tokenizer.encode("alpha gamma del", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["gamma delta", "xyz"]))
    assert detok.append(ids) is None
    assert detok.output_text == "alpha "
    detok.finish()
    assert detok.output_text == "alpha gamma del"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), include=st.booleans())
def test_held_back_text_is_never_retracted(tokenizer, data, include):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    start = data.draw(st.integers(0, len(ids) - 2))
    out = ids[start:data.draw(st.integers(start + 1, len(ids)))]
    full = tokenizer.decode(out)
    # Stop strings cut from the text (so they match, or are held back and then released),
    # some with a tail that cannot match (so they are only ever held back).
    n_stops = data.draw(st.integers(1, 3))
    stops = []
    for _ in range(n_stops):
        a = data.draw(st.integers(0, len(full) - 1))
        s = full[a:a + data.draw(st.integers(1, 6))] + data.draw(st.sampled_from(["", "\x00"]))
        stops.append(s)
    chunks = data.draw(st.lists(st.integers(1, 3), min_size=len(out), max_size=len(out)))
    detok, texts, got = stream(tokenizer, out, ids[:start], chunks, stop=stops,
                               include_stop_str_in_output=include)
    assert_never_retracted(texts)
    final = detok.output_text
    if got is None:
        assert final == full and not any(s in full for s in stops)
        return
    pos = len(final) - len(got) if include else len(final)
    assert full.startswith(final[:pos]) and full.find(got) == pos  # cut at got's first occurrence
    assert not any(s in full[:pos] for s in stops)
    if not include:  # what was shown never contained a stop string
        assert not any(s in t for t in texts for s in stops)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    hello, world = (tokenizer.encode(t, add_special_tokens=False) for t in ("Hello", " world"))
    ids = hello + [2] + world + [5, 0]  # <|im_end|>, <file_sep>, <|endoftext|>
    _, texts, _ = stream(tokenizer, ids, skip_special_tokens=skip)
    want = "Hello world" if skip else "Hello<|im_end|> world<file_sep><|endoftext|>"
    assert texts[-1] == want == tokenizer.decode(ids, skip_special_tokens=skip)


def test_decode_window_stays_small_on_long_outputs(tokenizer):
    """Per-step cost is O(new tokens): every decode call sees only a short window of ids."""
    windows = []

    class Counting:
        all_special_ids = tokenizer.all_special_ids
        added_tokens_decoder = tokenizer.added_tokens_decoder

        def decode(self, ids, **kw):
            windows.append(len(ids))
            return tokenizer.decode(ids, **kw)

    ids = tokenizer.encode(TEXT, add_special_tokens=False) * 10 + [2] * 200  # long run of skipped specials
    _, texts, _ = stream(Counting(), ids, stop=["never matches"])
    assert texts[-1] == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(windows) <= 12


def test_first_output_token_keeps_its_leading_space(tokenizer):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer.encode(chat, add_special_tokens=False)  # ends "<|im_start|>assistant\n"
    ids = tokenizer.encode(" Hello there", add_special_tokens=False)
    _, texts, _ = stream(tokenizer, ids, prompt)
    assert texts[0] == " Hello" and texts[-1] == " Hello there"


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A tiny sentencepiece-style tokenizer: Metaspace '▁' words, byte-fallback <0xNN> tokens for the rest."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator([TEXT, "Hello world, the answer is here."],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                    show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab = model["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in model["merges"]], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = trained.pre_tokenizer
    # Llama's decoder: '▁' -> ' ', bytes -> UTF-8, and strip the one leading space of a decode.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_byte_fallback_streams_exactly_with_leading_space(sp_tokenizer):
    text = "Hello 世界 😀 👨‍👩‍👧 ok"  # '世' etc. are not in the tiny vocab: several <0xNN> tokens each
    ids = sp_tokenizer.encode(text, add_special_tokens=False)
    assert sp_tokenizer.convert_ids_to_tokens(ids)[0] == "▁Hello"
    assert sp_tokenizer.decode(ids) == text  # decoding alone strips the first '▁'...
    prompt = sp_tokenizer.encode("Question: say it", add_special_tokens=False)
    _, texts, _ = stream(sp_tokenizer, ids, prompt)
    assert all("\ufffd" not in t for t in texts)
    assert_never_retracted(texts)
    assert texts[-1] == " " + text  # ...but after a prompt it is a real space, as in the full text


def test_incomplete_trailing_bytes_are_flushed_by_finish_as_decode_does(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # emoji cut after its first token
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for i in ids:
        detok.append([i])
    assert detok.output_text == "ok"  # the partial emoji is held, not shown as U+FFFD
    assert detok.finish() is None
    assert detok.output_text == tokenizer.decode(ids) == "ok \ufffd"


def test_prompt_ending_mid_character_does_not_corrupt_the_output(tokenizer):
    ids = tokenizer.encode("你好世界 and more", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    _, texts, _ = stream(tokenizer, ids[cut:], ids[:cut])
    assert texts[-1] == tokenizer.decode(ids[cut:])


def test_long_stop_string_prefix_is_held_and_each_character_matched_once(tokenizer):
    """The stop matcher sees only new text: held-back text is not rescanned however long the stop."""
    stop = (TEXT * 3)[:999] + "\x00"  # the text keeps re-entering a 999-character prefix of it
    ids = tokenizer.encode(TEXT, add_special_tokens=False) * 5
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[stop]))
    fed, feed = [], detok._stops.feed
    detok._stops.feed = lambda text, match=True: (fed.append(text), feed(text, match))[1]
    texts = []
    for i in ids:
        assert detok.append([i]) is None
        texts.append(detok.output_text)
    assert texts[-1] == TEXT * 2  # the last three repetitions start the stop: held back...
    assert detok.finish() is None
    assert detok.output_text == tokenizer.decode(ids) == "".join(fed)  # ...and each character fed once
    assert_never_retracted(texts + [detok.output_text])
