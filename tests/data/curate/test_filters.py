"""The per-document curation filters on strings, without Ray: Gopher and C4 rules, language ID,
PII redaction with near misses that must survive, decontamination, and the configured chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import CurateConfig, QualityConfig
from flows.data.curate import pii
from flows.data.curate.apply import Curator, Histogram
from flows.data.curate.decontam import DecontamError, Decontaminator, load_ngrams
from flows.data.curate.language import LanguageFilter, identify
from flows.data.curate.quality import C4Quality, GopherQuality, GopherRepetition
from tests.data.curate.texts import boilerplate, prose

HERE = Path(__file__).parent


def test_gopher_keeps_prose_and_names_the_rule_each_bad_text_breaks():
    gq, gr = GopherQuality(), GopherRepetition()
    for seed in range(20):
        assert gq.filter(prose(seed)) is None and gr.filter(prose(seed)) is None, prose(seed)
    bad = boilerplate(0)
    assert gq.filter("too short to be a document") == "gopher_short_doc"
    assert gq.filter(bad["symbols"]) == "gopher_short_words"  # "#$%1" strips to "1"
    assert gq.filter(bad["hashtags"]) == "gopher_hashes"
    assert gq.filter(bad["navigation"]) == "gopher_bullet_lines"
    assert gq.filter(bad["listing"]) == "gopher_ellipsis"
    assert gq.filter(bad["repeated"]) == "gopher_stop_words"
    assert gq.filter(" ".join(["supercalifragilistic"] * 60) + " the and of") == "gopher_long_words"
    assert gq.filter("1234 5678 90123 " * 20 + "the and of that") == "gopher_alpha_words"
    assert gr.filter(bad["repeated"]) == "gopher_dup_line_frac"
    assert gr.filter(bad["code"]) == "gopher_top_2_gram"
    assert gr.filter("word " * 60 + "the and") == "gopher_top_2_gram"
    assert gr.filter(prose(1) + prose(1)) == "gopher_dup_line_frac"  # the same paragraphs twice
    assert gr.filter(" ".join(prose(1).split()) * 2) == "gopher_dup_5_gram"  # ... as one line


def test_thresholds_are_constructor_arguments_and_none_switches_a_rule_off():
    assert (
        GopherQuality(min_doc_words=None).filter("a short but otherwise fine text of the kind")
        is None
    )
    assert GopherQuality(min_doc_words=3).filter("x y") == "gopher_short_doc"
    assert (
        GopherQuality(min_doc_words=2, min_stop_words=None, min_avg_word_length=1).filter("x y")
        is None
    )
    s = GopherRepetition().scores(prose(0))
    assert set(s) >= {"dup_line_frac", "top_2_gram", "dup_10_gram"} and all(
        0 <= v <= 1 for v in s.values()
    )


def test_c4_rules_drop_lorem_and_braces_and_remove_javascript_and_policy_lines():
    c4 = C4Quality(filter_no_terminal_punct=False, min_words_per_line=0, min_num_sentences=0)
    assert c4.filter(boilerplate(0)["lorem"]) == "c4_lorem_ipsum"
    assert c4.filter('Use it like this: {"a": 1}.') == "c4_curly_bracket"
    assert C4Quality(filter_curly_bracket=False, min_num_sentences=0).filter("It is {a}.") is None
    text = (
        "A fine first line.\nPlease enable JavaScript to view this page.\n"
        "This site uses cookies.\nThe end."
    )
    cleaned, reason, removed = c4.clean(text)
    assert reason is None and removed == 2 and cleaned == "A fine first line.\nThe end."
    strict = (
        C4Quality()
    )  # the published defaults: terminal punctuation, 3 words a line, 5 sentences
    assert strict.filter("no punctuation here\nnor here") == "c4_too_few_sentences"
    assert strict.filter(prose(3)) is None


def test_language_id_on_short_chat_texts_keeps_english_and_drops_the_rest():
    rows = [json.loads(line) for line in (HERE / "multilingual.jsonl").read_text().splitlines()]
    assert len({r["lang"] for r in rows}) >= 10
    f = LanguageFilter(("en",))
    verdicts = [(f.filter(r["text"]), r["lang"]) for r in rows]
    english = [v for v, lang in verdicts if lang == "en"]
    kept_other = [lang for v, lang in verdicts if v is None and lang != "en"]
    assert sum(v is None for v in english) >= 0.9 * len(english)
    assert len(kept_other) <= 0.03 * sum(v is None for v, _ in verdicts)
    assert identify("Das Wetter ist heute wirklich schön und warm")[0] == "de"
    assert identify("12345 ++ --") == ("un", 0.0)
    assert f.filter("Встреча перенесена на четверг, приходи вовремя") == "language.ru"
    assert LanguageFilter(()).filter("Встреча перенесена на четверг") is None  # empty keeps all


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("write to jane.doe+news@example.co.uk today", {"email": 1}),
        ("call +44 20 7946 0958 or (415) 555-0132 or 415-555-0132", {"phone": 3}),
        ("the server at 93.184.216.34 and 2606:2800:220:1:248:1893:25c8:1946", {"ip": 2}),
        ("card 4111 1111 1111 1111, amex 3782-822463-10005", {"card": 2}),
        ("pay to DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432", {"iban": 2}),
    ],
)
def test_pii_is_found_and_replaced_by_placeholders(text, kinds):
    redacted, counts = pii.redact(text)
    assert dict(counts) == kinds
    for kind in kinds:
        assert pii.PLACEHOLDERS[kind] in redacted
    assert not pii.find(redacted)


@pytest.mark.parametrize(
    "text",
    [
        "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2",  # ISBN-13 and ISBN-10
        "Python 3.11.4, v1.2.3.4, version 10.0.0.1, release 2.7.2.2",  # version numbers
        "on 2023-10-05, 05/10/2023, 12.03.2024 at 12:30:45",  # dates and times
        "a card-like 4111 1111 1111 1112 that fails Luhn, and order 1234567890123",
        "DE89 3704 0044 0532 0130 01 fails mod-97",  # an IBAN with a wrong check
        "slices x[::2], a::b, ratios 3:4:5 and the loopback ::1",
        "private and documentation addresses 192.168.0.1, "
        "10.0.0.7, 127.0.0.1, 192.0.2.1, 2001:db8::1",
        "prices 1,234,567.89 and 12 345 678; pi is 3.14159265358979",
        "not an address: user@localhost or @handle",
        "format specs give +000000120 and '+3.140000'",  # signed numbers, not phone numbers
    ],
)
def test_pii_near_misses_survive(text):
    assert pii.redact(text) == (text, {})


def test_decontamination_drops_documents_sharing_a_13_gram_with_an_eval_file(tmp_path):
    question = (
        "What is the name of the river that flows through the old town of Heidelberg in Germany?"
    )
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"question": question, "answer": ["the Neckar"]}) + "\n"
    )
    (tmp_path / "eval.txt").write_text(
        "A completely different evaluation sentence that has more than thirteen "
        "words in it for sure.\n"
    )
    grams = load_ngrams((str(tmp_path / "eval.jsonl"), str(tmp_path / "eval.txt")), 13)
    d = Decontaminator(grams, 13)
    assert (
        d.filter(prose(0) + " Quiz: " + question.upper() + " Think about it.") == "decontaminated"
    )
    assert d.filter(prose(0)) is None
    # Twelve of the question's words in a row are not a 13-gram of it.
    assert d.filter("We asked " + " ".join(question.split()[:12]) + " and moved on.") is None
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DecontamError, match="bad.jsonl:1"):
        load_ngrams((str(tmp_path / "bad.jsonl"),), 13)
    with pytest.raises(DecontamError, match="missing.jsonl"):
        load_ngrams((str(tmp_path / "missing.jsonl"),), 13)


def test_the_chain_applies_what_the_config_switches_on():
    text = prose(5) + "Mail me at someone@example.com."
    assert Curator(CurateConfig()).apply(text).text.endswith("Mail me at <EMAIL>.")
    assert Curator(CurateConfig(pii="off")).apply(text).text == text
    v = Curator(CurateConfig(pii="drop")).apply(text)
    assert v.text is None and v.reason == "pii" and v.pii == {"email": 1}
    strict = Curator(CurateConfig(quality=QualityConfig(enabled=True), languages=("en",)))
    assert strict.apply(boilerplate(1)["symbols"]).reason in ("gopher_alpha_words", "language.un")
    v = strict.apply(prose(2))
    assert v.text is not None and v.language == "en" and v.scores["words"] > 50
    h = Histogram()
    h.add(v.scores)
    assert sum(h.to_dict()["words"]) == 1 and sum(h.to_dict()["language_score"]) == 1
