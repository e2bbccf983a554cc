"""StopChecker: hold-back across pieces, trimming before the match, release at the end."""

import pytest

from astrai.inference import StopChecker


def _feed(checker, pieces):
    return [checker.push(p) for p in pieces]


def test_match_inside_one_piece_trims_before_it():
    c = StopChecker(["###"])
    assert c.push("Hello ### world") == "Hello "
    assert c.matched == "###"
    assert c.push("more") == ""
    assert c.flush() == ""


def test_stop_string_split_across_pieces_is_held_back_then_trimmed():
    c = StopChecker(["\nUser:"])
    assert _feed(c, ["Sure.", "\nUs", "er", ": hi"]) == ["Sure.", "", "", ""]
    assert c.matched == "\nUser:"


def test_held_text_is_released_when_it_stops_looking_like_a_stop_string():
    c = StopChecker(["STOP"])
    assert c.push("a ST") == "a "
    assert c.held == "ST"
    assert c.push("ART") == "START"
    assert c.matched is None


def test_flush_releases_the_tail_at_the_end_of_the_stream():
    c = StopChecker(["</s>"])
    assert c.push("text</") == "text"
    assert c.flush() == "</"
    assert c.matched is None


def test_earliest_match_wins_and_ties_go_to_the_first_listed():
    assert StopChecker(["b", "a"]).check("xab") == "a"
    assert StopChecker(["ab", "a"]).check("xab") == "ab"
    assert StopChecker(["zz"]).check("xab") is None


def test_hold_back_takes_the_longest_possible_start():
    c = StopChecker(["abc", "bcd"])
    assert c.push("xab") == "x"  # "ab" may begin "abc"
    assert c.push("c") == ""  # "abc" completed
    assert c.matched == "abc"


def test_no_stop_strings_passes_everything_through():
    c = StopChecker(None)
    assert _feed(c, ["a", "b"]) == ["a", "b"]
    assert c.flush() == ""


@pytest.mark.parametrize("bad", [[""], ["ok", 3]])
def test_invalid_stop_sequences_raise_value_error(bad):
    with pytest.raises(ValueError, match="stop"):
        StopChecker(bad)
