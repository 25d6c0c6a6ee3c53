"""tags.py: parsing, pruning order, frequency."""

from sdlora.data.tags import (
    drop_rare,
    format_caption,
    parse_caption,
    prune,
    tag_frequency,
)


def test_parse_caption_splits_strips_and_keeps_case():
    assert parse_caption(" Mountains ,lake,,  pastel\n  colors , \n") == ["Mountains", "lake", "pastel colors"]
    assert parse_caption("") == []
    assert format_caption(["clrscn", "lake"]) == "clrscn, lake"


def test_tag_frequency_counts_captions_per_lowercase_tag():
    freq = tag_frequency(["clrscn, Lake, sky", "clrscn, lake", "clrscn, lake, lake"])
    assert freq == {"clrscn": 3, "lake": 3, "sky": 1}
    assert list(freq) == ["clrscn", "lake", "sky"]


def test_prune_order_blacklist_then_replace_then_dedupe_then_style_then_trigger():
    tags = ["sea", "scenery", "ocean", "Lake", "lake", "pastel colors", "clrscn", "sunset", "colorful"]
    out = prune(tags, trigger="clrscn", blacklist=["scenery", "ocean"], replace={"sea": "water", "Lake": "water"},
                style_tags=["Pastel Colors", "colorful"])
    # "ocean" blacklisted; "sea" and "Lake"/"lake" all become "water", kept once where first seen;
    # style tags gone; the trigger moved to the front.
    assert out == ["clrscn", "water", "sunset"]


def test_blacklist_runs_before_replace_and_catches_a_rule_target():
    # A blacklisted tag is removed before any rule could rename it ...
    assert prune(["sky"], blacklist=["sky"], replace={"sky": "heaven"}) == []
    # ... and a rule whose target is blacklisted removes the tag too.
    assert prune(["sea"], blacklist=["ocean"], replace={"sea": "ocean"}) == []
    # A rule to "" deletes.
    assert prune(["a", "b"], replace={"b": ""}) == ["a"]


def test_prune_without_trigger_and_style_tags_are_not_duplicated_back():
    assert prune(["a", "b", "a"]) == ["a", "b"]
    assert prune(["clrscn"], trigger="clrscn") == ["clrscn"]


def test_drop_rare_keeps_the_trigger():
    caps = [["t", "lake", "sky"], ["t", "lake"], ["t", "moon"]]
    pruned, dropped = drop_rare(caps, 2, keep=["t"])
    assert pruned == [["t", "lake"], ["t", "lake"], ["t"]]
    assert dropped == ["moon", "sky"]
    assert drop_rare(caps, 1)[0] == caps
