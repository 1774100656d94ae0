"""Incremental detokenizer tests with the real SmolLM2 tokenizer (byte-level BPE): multi-byte characters
split over byte tokens, stop strings across token boundaries, held-back text and flush."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from leanserve.server.engine.detokenizer import DetokenizedDelta, IncrementalDetokenizer

CHAT_PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> list[DetokenizedDelta]:
    """Feeds `ids` `chunk` at a time, stopping at a stop string as the engine does."""
    deltas = []
    for start in range(0, len(ids), chunk):
        deltas.append(detok.add_tokens(ids[start : start + chunk]))
        if deltas[-1].stop_reason is not None:
            break
    return deltas


@pytest.mark.parametrize(
    "text",
    [
        "Plain ASCII, with punctuation; and\nnew lines\tand tabs.",
        "我爱北京天安门",  # each character is split over two or three byte tokens
        "Emoji 😀 with skin tone 👍🏽 and flags 🇫🇷!",
        "naïve café, Ünïcödé, Ελληνικά, русский",
        "mixed 中文 and 日本語のテキスト 🎉🎉 done.",
    ],
)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("prompt", ["", CHAT_PROMPT])
def test_stream_never_emits_a_broken_character(tokenizer, text, chunk, prompt):
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), stop=[])
    deltas = stream(detok, ids, chunk)
    assert all("\ufffd" not in d.text and d.stop_reason is None for d in deltas)
    assert "".join(d.text for d in deltas) + detok.flush() == text == tokenizer.decode(ids)
    assert detok.output_text == text


def test_multibyte_character_held_until_its_last_byte(tokenizer):
    ids = encode(tokenizer, "ok 😀")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 2  # the emoji really is split into byte tokens
    detok = IncrementalDetokenizer(tokenizer, [], stop=[])
    texts = [detok.add_tokens([i]).text for i in ids]
    assert texts == ["ok"] + [""] * (len(ids) - 2) + [" 😀"]


@pytest.mark.parametrize(
    ("text", "stop", "expected", "reason"),
    [
        ("The answer is 42.\n\nUser: next", ["\n\nUser:"], "The answer is 42.", "\n\nUser:"),
        ("Stop word: END_OF_TURN here", ["END_OF_TURN"], "Stop word: ", "END_OF_TURN"),
        ("Stop word: END_OF_TURN here", ["here", "_OF", "OF_T"], "Stop word: END", "_OF"),  # earliest wins
        ("Stop word: END_OF_TURN here", ["URN", "_TURN"], "Stop word: END_OF", "_TURN"),  # both end at "URN"
        ("The answer is 42.", ["nswe"], "The a", "nswe"),  # inside one token: the rest is cut
        ("我爱北京天安门", ["北京"], "我爱", "北京"),  # over byte tokens
        ("Emoji 😀 then more", ["😀"], "Emoji ", "😀"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 2])
def test_stop_string_across_tokens_is_caught_and_not_returned(tokenizer, text, stop, expected, reason, chunk):
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, CHAT_PROMPT), stop=stop)
    deltas = stream(detok, ids, chunk)
    assert [d.stop_reason for d in deltas] == [None] * (len(deltas) - 1) + [reason]
    assert "".join(d.text for d in deltas) == expected == detok.output_text
    # Finished by the stop string: nothing more comes out.
    assert detok.add_tokens(ids[-1:]) == DetokenizedDelta("", reason)
    assert detok.flush() == ""


def test_stop_strings_wait_for_min_tokens(tokenizer):
    """A stop string inside the first min_tokens tokens is text like any other; after them it stops."""
    text = "one, two, three, four, five"
    ids = encode(tokenizer, text)
    early = text.index(",")  # in the first token or two
    plain = IncrementalDetokenizer(tokenizer, [], stop=[","])
    assert "".join(d.text for d in stream(plain, ids)) == text[:early]
    detok = IncrementalDetokenizer(tokenizer, [], stop=[","], min_tokens=4)
    deltas = stream(detok, ids)
    # As vLLM: the check starts once the 4th token is in, so the first three tokens' text is exempt.
    exempt = tokenizer.decode(ids[:3])
    assert exempt.count(",") >= 1  # the minimum covers a stop string, which is kept
    assert deltas[-1].stop_reason == "," and detok.output_text == text[: text.index(",", len(exempt))]
    short = IncrementalDetokenizer(tokenizer, [], stop=[","], min_tokens=len(ids) + 1)
    assert "".join(d.text for d in stream(short, ids)) + short.flush() == text  # never reached: no stop


def test_stop_string_really_spans_tokens(tokenizer):
    """The multi-token cases above are multi-token: no single token's text contains the stop string."""
    for text, stop in [
        ("The answer is 42.\n\nUser: next", "\n\nUser:"),
        ("Stop word: END_OF_TURN", "END_OF_TURN"),
    ]:
        assert stop in text
        assert all(stop not in tokenizer.decode([i]) for i in encode(tokenizer, text))


def test_possible_stop_prefix_is_held_back_then_released(tokenizer):
    ids = encode(tokenizer, "A stopwatch")
    assert [tokenizer.decode([i]) for i in ids] == ["A", " stop", "watch"]
    detok = IncrementalDetokenizer(tokenizer, [], stop=["stop!"])
    texts = [detok.add_tokens([i]) for i in ids]
    # " stop" might begin "stop!": only the space goes out until "watch" rules it out.
    assert texts == [DetokenizedDelta(t, None) for t in ["A", " ", "stopwatch"]]


@pytest.mark.parametrize(
    ("text", "drop_last", "stop", "streamed", "flushed"),
    [
        ("The answer is 42", 0, ["42!"], "The answer is ", "42"),  # a stop-string prefix at the end
        ("The answer is 42", 0, ["is 42 and"], "The answer ", "is 42"),
        ("ok 😀", 1, [], "ok", " \ufffd"),  # the emoji's last byte never came
        ("Nothing held", 0, ["zzz"], "Nothing held", ""),
    ],
)
def test_flush_returns_held_back_text(tokenizer, text, drop_last, stop, streamed, flushed):
    ids = encode(tokenizer, text)
    ids = ids[: len(ids) - drop_last]
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
    assert "".join(d.text for d in stream(detok, ids)) == streamed
    assert detok.output_text == streamed
    assert detok.flush() == flushed
    assert detok.output_text == streamed + flushed == tokenizer.decode(ids)
    assert detok.flush() == ""


@pytest.mark.parametrize(("skip", "expected"), [(True, "Hi there"), (False, "Hi there<|im_end|>")])
def test_special_tokens_skipped_or_kept(tokenizer, skip, expected):
    ids = [*encode(tokenizer, "Hi there"), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    detok = IncrementalDetokenizer(
        tokenizer, encode(tokenizer, CHAT_PROMPT), stop=[], skip_special_tokens=skip
    )
    assert "".join(d.text for d in stream(detok, ids)) + detok.flush() == expected


class _ReferenceDetokenizer:
    """The stop-string semantics spelled out naively on the whole text: after each token, cut at the
    earliest-starting stop string found past the emitted text, else hold back the longest end of the
    text that some stop string starts with."""

    def __init__(self, stop: list[str]):
        self.stop, self.emitted, self.text = stop, 0, ""

    def add(self, text: str) -> DetokenizedDelta:
        self.text = text
        matches = [(p, s) for s in self.stop if (p := text.find(s, self.emitted)) >= 0]
        if matches:
            pos, reason = min(matches, key=lambda m: m[0])
            delta, self.emitted = text[self.emitted : pos], pos
            return DetokenizedDelta(delta, reason)
        pending = text[self.emitted :]
        held = max(
            (
                n
                for s in self.stop
                for n in range(1, min(len(s) - 1, len(pending)) + 1)
                if pending.endswith(s[:n])
            ),
            default=0,
        )
        end = max(self.emitted, len(text) - held)
        delta, self.emitted = text[self.emitted : end], end
        return DetokenizedDelta(delta, None)


def test_stop_matching_agrees_with_the_naive_reference(tokenizer):
    """Random ASCII texts over a small alphabet (many partial matches, overlapping stop strings)."""
    import random

    rng = random.Random(26)
    for _ in range(150):
        text = "".join(rng.choice("ab a.b") for _ in range(rng.randint(1, 60)))
        stop = [
            "".join(rng.choice("ab .") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
        ]
        ids = encode(tokenizer, text)
        detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
        reference = _ReferenceDetokenizer(stop)
        for k in range(1, len(ids) + 1):
            got = detok.add_tokens([ids[k - 1]])
            assert got == reference.add(tokenizer.decode(ids[:k])), (text, stop, k)
            if got.stop_reason is not None:
                break


def test_long_stop_strings_cost_linear_time(tokenizer):
    """Issue 26: 15 stop strings of thousands of characters that the text keeps almost matching. The
    per-token cost must not grow with the text (the old hold-back check sliced every prefix of every stop
    string each token: quadratic, hundreds of ms a token)."""
    import time

    # The text is held back (it may begin the last stop string) and the others never match it: the old
    # check tried every prefix length of each of them against the growing held-back text.
    stop = ["y" * (3000 + i) + "!" for i in range(14)] + ["x" * 4000 + "!"]
    ids = encode(tokenizer, "x" * 6000)
    detok = IncrementalDetokenizer(tokenizer, [], stop=stop)
    costs = []
    for token_id in ids:
        started = time.thread_time()
        delta = detok.add_tokens([token_id])
        costs.append(time.thread_time() - started)
        assert delta.stop_reason is None
    assert len(ids) > 600
    first, last = sum(costs[100:300]), sum(costs[-200:])
    assert last < 3 * first + 0.05, (first, last)
    assert sum(costs) < 3.0
    # Everything that might begin a stop string is held back, and the rest went out.
    assert len(detok.output_text) == 6000 - max(len(s) - 1 for s in stop)
