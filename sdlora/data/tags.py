"""Pure functions on tag lists: parse, prune, count, format.

A caption is comma-separated tags, `clrscn, mountains, lake, sunset` (the Kohya/A1111
convention). Tags keep their case as written: the CLIP tokenizer lowercases anyway, but
a user's spelling is theirs and is not rewritten. Comparisons (blacklist, replace,
de-duplication, style tags, frequency) are case-insensitive, and `tag_frequency` counts
lowercase tags as kohya's ss_tag_frequency does.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_SPACES = re.compile(r"\s+")


def normalise_tag(tag: str) -> str:
    """Whitespace collapsed and trimmed; case kept."""
    return _SPACES.sub(" ", tag).strip()


def tag_key(tag: str) -> str:
    """What two tags are compared by: their normalised, lowercase text."""
    return normalise_tag(tag).lower()


def parse_caption(text: str) -> list[str]:
    """'a,  b ,, c\\n' -> ['a', 'b', 'c']: split on commas, collapse whitespace, drop empties."""
    return [t for t in (normalise_tag(part) for part in text.split(",")) if t]


def format_caption(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """{lowercase tag: number of captions carrying it}, most frequent first (ss_tag_frequency)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({tag_key(t) for t in parse_caption(caption)})
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def prune(tags: Iterable[str], trigger: str = "", blacklist: Iterable[str] = (), replace: dict[str, str] | None = None,
          style_tags: Iterable[str] = ()) -> list[str]:
    """One image's tags, cleaned in this order:

    1. blacklisted tags removed;
    2. synonym rules applied (`replace = {"sea" = "ocean"}`; a rule to "" deletes the tag);
    3. duplicates removed, the first occurrence kept (order preserved);
    4. style tags removed: the trigger absorbs the style, so they would only dilute it;
    5. the trigger put first (moved there if the tagger or the user wrote it elsewhere).

    Blacklisting runs before the synonyms, so a rule cannot resurrect a blacklisted tag's
    synonym by accident, and the blacklist is checked again after renaming so that a
    rule's target can be blacklisted too.
    """
    black = {tag_key(t) for t in blacklist}
    rules = {tag_key(k): normalise_tag(v) for k, v in (replace or {}).items()}
    style = {tag_key(t) for t in style_tags}
    trig = normalise_tag(trigger)
    out, seen = [], set()
    for tag in tags:
        tag = normalise_tag(tag)
        if not tag or tag_key(tag) in black:
            continue
        tag = rules.get(tag_key(tag), tag)
        key = tag_key(tag)
        if not tag or key in black or key in seen:
            continue
        seen.add(key)
        if key in style or (trig and key == tag_key(trig)):
            continue
        out.append(tag)
    return [trig, *out] if trig else out


def drop_rare(captions: list[list[str]], min_count: int, keep: Iterable[str] = ()) -> tuple[list[list[str]], list[str]]:
    """Remove tags carried by fewer than `min_count` captions of the set (the trigger and `keep` stay).

    Returns (pruned captions, dropped tags sorted). Run after `prune`, across the whole set.
    """
    if min_count <= 1:
        return [list(c) for c in captions], []
    counts = Counter(k for c in captions for k in {tag_key(t) for t in c})
    kept_keys = {tag_key(t) for t in keep}
    rare = {k for k, n in counts.items() if n < min_count and k not in kept_keys}
    pruned = [[t for t in c if tag_key(t) not in rare] for c in captions]
    return pruned, sorted(rare)
