"""Cleaning steps, one spec.data.preprocessing field each."""

from __future__ import annotations

import random

from llmtrain.runtime.data.clean import CleanConfig, clean_document, clean_text, content_hash, dedup_keep

RAW = CleanConfig(normalization="none", remove_control_chars=False, normalize_whitespace=False, dedup="none")


def test_normalization_forms() -> None:
    decomposed = "e\u0301"  # e + combining acute
    assert clean_text(decomposed, CleanConfig(normalization="NFC")) == "\u00e9"
    assert clean_text("\u00e9", CleanConfig(normalization="NFD")) == decomposed
    assert clean_text("ﬁ", CleanConfig(normalization="NFKC")) == "fi"  # compatibility ligature
    assert clean_text("ﬁ", CleanConfig(normalization="NFC")) == "ﬁ"
    assert clean_text(decomposed, CleanConfig(normalization="none")) == decomposed


def test_remove_control_chars() -> None:
    text = "a\x00b\x07c\x1bd\x7fe\x85f\tg\nh"
    assert clean_text(text, CleanConfig(remove_control_chars=True)) == "abcdef\tg\nh"
    assert clean_text(text, CleanConfig(remove_control_chars=False)) == text
    # CR survives control-char removal when whitespace is not normalised (CRLF round-trips)
    kept = CleanConfig(remove_control_chars=True, normalize_whitespace=False)
    assert clean_text("x\r\ny", kept) == "x\r\ny"


def test_normalize_whitespace() -> None:
    text = "a  \r\nb\rc\t \n\n\n\n\n\nd   "
    on = CleanConfig(normalize_whitespace=True)
    assert clean_text(text, on) == "a\nb\nc\n\n\nd"
    off = CleanConfig(normalize_whitespace=False, remove_control_chars=False)
    assert clean_text(text, off) == text
    # two blank lines are kept as written; leading indentation is never touched
    assert clean_text("  x\n\n\ny", on) == "  x\n\n\ny"


def test_min_chars() -> None:
    cfg = CleanConfig(min_chars=5)
    assert clean_document("1234", cfg) == (None, "min_chars")
    assert clean_document("12345", cfg) == ("12345", None)
    assert clean_document("  \n ", CleanConfig(min_chars=0)) == (None, "empty")


def test_max_chars() -> None:
    cfg = CleanConfig(max_chars=5)
    assert clean_document("123456", cfg) == (None, "max_chars")
    assert clean_document("12345", cfg) == ("12345", None)
    assert clean_document("1" * 10**6, CleanConfig(max_chars=None))[1] is None


def test_dedup_exact_keeps_smallest_key_in_any_order() -> None:
    pairs = [("k3", content_hash("same")), ("k1", content_hash("same")), ("k2", content_hash("other"))]
    for _ in range(5):
        random.shuffle(pairs)
        keep, dups = dedup_keep(pairs, CleanConfig(dedup="exact"))
        assert keep == {"k1", "k2"} and dups == 1


def test_dedup_none_keeps_duplicates() -> None:
    pairs = [("a", content_hash("x")), ("b", content_hash("x"))]
    assert dedup_keep(pairs, CleanConfig(dedup="none")) == ({"a", "b"}, 0)


def test_raw_config_is_identity() -> None:
    text = " \x01 e\u0301 \r\n\n\n\n\n  "
    assert clean_text(text, RAW) == text
