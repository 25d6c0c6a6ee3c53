"""A1111's prompt syntax, checked against references written here from A1111's documented rules
(modules/prompt_parser.py), independent of sdlora's code: emphasis (a scanner, one character at a
time) and prompt editing / alternation (A1111's lark grammar, parsed by lark itself, as A1111 does).
Each corpus prompt must come out of sdlora's parser exactly as out of the reference."""

import re

import pytest

from sdlora.errors import UserError
from sdlora.models import prompts

# ---------------------------------------------------------------------------------------------
# Emphasis: A1111's rules, scanned one character at a time
#   \\( \\) \\[ \\] \\\\  a literal bracket or backslash (a lone backslash is dropped)
#   (  opens x1.1   [  opens /1.1   ) ]  close the innermost of their kind, else they are text
#   ":" spaces, a number made of [+-] digits and dots, spaces, ")" closes a round bracket with that
#   number instead of 1.1 (with no round bracket open, all of it is text); another ":" is text
#   unclosed brackets apply to the end; BREAK (a whole word, spaces around it eaten) starts a chunk
#   neighbouring runs of equal weight merge


def reference_attention(text):
    runs, rounds, squares, plain = [], [], [], []

    def flush():
        if plain:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", "".join(plain))):
                if i:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])
            plain.clear()

    def scale(start, factor):
        for run in runs[start:]:
            run[1] *= factor

    def weight_close(i):  # (number, index after ")") when a weighted close starts at the ":" at i
        j = i + 1
        while j < len(text) and text[j].isspace():
            j += 1
        k = j + (j < len(text) and text[j] in "+-")
        m = k
        while m < len(text) and (text[m].isdigit() or text[m] == "."):
            m += 1
        if m == k:
            return None
        n = m
        while n < len(text) and text[n].isspace():
            n += 1
        return (text[j:m], n + 1) if n < len(text) and text[n] == ")" else None

    i = 0
    while i < len(text):
        c = text[i]
        if c not in "\\()[]:":
            plain.append(c)
            i += 1
            continue
        flush()
        if c == "\\":
            escaped = text[i + 1:i + 2] if text[i + 1:i + 2] in ("(", ")", "[", "]", "\\") else ""
            runs.append([escaped, 1.0])
            i += 1 + len(escaped)
        elif c == "(":
            rounds.append(len(runs))
            i += 1
        elif c == "[":
            squares.append(len(runs))
            i += 1
        elif c == ":":
            close = weight_close(i)
            if close and rounds:
                scale(rounds.pop(), float(close[0]))
                i = close[1]
            else:
                end = close[1] if close else i + 1
                plain.extend(text[i:end])
                flush()
                i = end
        elif c == ")" and rounds:
            scale(rounds.pop(), 1.1)
            i += 1
        elif c == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
            i += 1
        else:
            runs.append([c, 1.0])
            i += 1
    flush()
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


ATTENTION_CORPUS = [
    "masterpiece, best quality, a house",
    "(masterpiece: 1.2)", "(masterpiece:1.2 )", "(a :1.2)", "( a : 1.5 ), b", "(a:1.5 x)", "(a: 1.2 b: 1.3)",
    "(a:-0.5)", "(a:+2)", "(a:.5)", "(a:5.)", "a:1.2)", "b) a]", "(a:1.2", ":1.2) c",
    "((a)), [[b]], (((c:1.3))), [d:0.5]", "(a [b (c:1.5) d] e)", "((a:1.2):1.5)", "(a (b) c",
    "\\(escaped\\) \\[brackets\\] \\\\ back", "a \\ b", "\\", "\\(a:1.2\\)", "(\\(a\\):1.3)",
    "a BREAK b", "(a BREAK b:1.2)", "aBREAK b", "a BREAK, b", "BREAK", "a BREAK BREAK b", "a\nBREAK\nb",
    "a (b)BREAK(c) d", "", "   ", "(", ")", "[]", "()", "(:1.2)", "((((", "]]]]",
    "1girl, (detailed eyes:1.1), [blurry], (red hair:0.8), 8k",
]


@pytest.mark.parametrize("text", ATTENTION_CORPUS)
def test_emphasis_equals_a1111s_rules(text):
    got, expected = prompts.parse_attention(text), reference_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_spaces_around_an_emphasis_weight():
    """Current A1111 (its 1.7+ parser, as in Forge) reads `:\\s*number\\s*)`:
    `(masterpiece: 1.2)` is masterpiece at 1.2, not text at x1.1 as in older releases."""
    assert prompts.parse_attention("(masterpiece: 1.2)") == [("masterpiece", 1.2)]
    assert prompts.parse_attention("(a:1.5 )") == [("a", 1.5)]
    assert prompts.parse_attention("(a: 1.2 b)") == [("a: 1.2 b", 1.1)]


def test_a_weight_that_is_not_a_number_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"'\.' is not a weight"):
        prompts.parse_attention("(a:.)")
    with pytest.raises(UserError, match=r"'1\.2\.3' is not a weight"):
        prompts.parse_attention("(a:1.2.3)")


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation: A1111's grammar (schedule_parser) run by lark, and its rules for
# the steps (get_learned_conditioning_prompt_schedules, new timelines):
#   [from:to:when] [to:when] [from::when]: `when` with a dot is a fraction of the pass's steps
#   (hires pass: minus 1), without one a step number (hires pass: minus the first pass's steps);
#   capped at the pass's steps; the text is `from` while step <= when. [a|b|c] takes option
#   (step - 1) mod n. Ends: the pass's steps, every `when` >= 1, every step when anything alternates.
#   A prompt the grammar rejects is not edited at all.

lark = pytest.importorskip("lark")

GRAMMAR = lark.Lark(r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
""")


def reference_schedule(prompt, steps, hires_steps=None):
    try:
        tree = GRAMMAR.parse(prompt)
    except lark.exceptions.LarkError:
        return [(hires_steps or steps, prompt)]
    total = hires_steps or steps

    def end(node):
        when = str(node.children[-2])
        if hires_steps is None:
            value = float(when) * total if "." in when else float(when)
        else:
            value = (float(when) - 1) * total if "." in when else float(when) - steps
        return min(total, int(value))

    def text(node, step):
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return str(node)
        if node.data == "scheduled":
            before, after = node.children[0], node.children[1]
            return text(before if step <= end(node) else after, step)
        if node.data == "alternate":
            return text(node.children[(step - 1) % len(node.children)], step)
        return "".join(text(child, step) for child in node.children)

    ends = {total} | {end(n) for n in tree.find_data("scheduled") if end(n) >= 1}
    if any(tree.find_data("alternate")):
        ends |= set(range(1, total + 1))
    return [(e, text(tree, e)) for e in sorted(ends)]


EDITING_CORPUS = [
    "a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25] "
    "[shoddy:masterful:0.5]",
    "test", "a [b:3]", "a [b: 3]", "a [b:3 ]", "a [b : c : 1] d", "a[b:[c:d:2]:1]e", "a [[[b]]:2]", "[(a:2):3]",
    "a [unbalanced", "a [b:.5] c", "a [b:1.5] c", "a [b:1.0] c", "a [b:0.05] c", "a [b:12] c", "a [b:25] c",
    "a [b:0] c", "a [b:-3] c", "a [b:1e1] c", "a [b:+4] c", "a [b:c:d:3]", "a [b:c]", "(a:[b:c:2])",
    "((a][:b:c [d:3]", "[a|(b:1.1)]", "[fe|]male", "[fe|||]male", "[cat|dog|bird] in a [red|blue] room",
    "[a|[b:c:3]]", "[[a|b]:c:0.5]", "[a|b", "a | b [c:d:2]", "a [{b|d{:.5] c", "trailing \\", "esc \\[a:b:2\\]",
    "[a:b:2] \\(c\\)", "(a [b:c:2]:1.2)", "[a:b:2] BREAK [c|d]", "((masterpiece)), [a::0.5], (b:1.1)",
    "[a:(b:1.2):0.3]", "[ : :1]", "[:2]", "[::2]", "[[a:b:2]", "a [b:3] [c:0.5] [d|e|f]",
    "multi\nline [a:b:2]", "[a\nb:c:2]",
]
STEP_COUNTS = [(1, None), (2, None), (10, None), (20, None), (37, None), (10, 10), (20, 8), (4, 15)]


@pytest.mark.parametrize("steps, hires_steps", STEP_COUNTS)
@pytest.mark.parametrize("prompt", EDITING_CORPUS)
def test_prompt_schedules_equal_a1111s(prompt, steps, hires_steps):
    assert prompts.prompt_schedule(prompt, steps, hires_steps) == reference_schedule(prompt, steps, hires_steps)


def test_a1111s_documented_schedules():
    """The examples in A1111's own docstrings (10 steps; the hires ones with 10 hires steps)."""
    g = lambda p, hires=None: [list(x) for x in prompts.prompt_schedule(p, 10, hires)]  # noqa: E731
    assert g("a [b:3]") == [[3, "a "], [10, "a b"]]
    assert g("a [b : c : 1] d") == [[1, "a b  d"], [10, "a  c  d"]]
    assert g("a[b:[c:d:2]:1]e") == [[1, "abe"], [2, "ace"], [10, "ade"]]
    assert g("((a][:b:c [d:3]") == [[3, "((a][:b:c "], [10, "((a][:b:c d"]]
    assert g("[fe|||]male")[:4] == [[1, "female"], [2, "male"], [3, "male"], [4, "male"]]
    assert g("a [b:.5] c", 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10) == [[5, "a  c"], [10, "a b c"]]
    big = prompts.prompt_schedule(EDITING_CORPUS[0], 100)
    assert big[0] == (25, "a mountain and an oak in foreground shoddy")
    assert big[-1] == (100, "a lake and a christmas tree in background masterful")


def test_an_edit_touching_stray_brackets_is_an_edit():
    """Where an edit touches stray brackets or colons (`[a:b:2]]`, `[a:b:2]):`), the grammar has
    two readings; lark picks one by its internal ordering, which in A1111's pinned lark 1.1.2
    changes with the process's hash seed (PYTHONHASHSEED), so A1111 itself is not repeatable
    there. sdlora always takes the edit."""
    assert prompts.prompt_schedule("[a:b:2]]", 4) == [(2, "a]"), (4, "b]")]
    assert prompts.prompt_schedule("[a:b:2]):", 4) == [(2, "a):"), (4, "b):")]


def test_an_edit_beyond_any_float_ends_with_the_pass():
    assert prompts.prompt_schedule("[a:b:1e999]", 4) == [(4, "a")]
    assert prompts.prompt_schedule("[a:b:-1e999]", 4) == [(4, "b")]


def test_each_step_takes_the_first_text_whose_end_it_has_not_passed():
    """A1111's sampler counts steps from 0 and switches after step `end`: [a:b:2] is a for 3 steps."""
    schedule = prompts.prompt_schedule("[a:b:2]", 5)
    assert [prompts.text_at(schedule, i) for i in range(5)] == ["a", "a", "a", "b", "b"]
    schedule = prompts.prompt_schedule("[a|b]", 4)
    assert [prompts.text_at(schedule, i) for i in range(4)] == ["a", "a", "b", "a"]


# ---------------------------------------------------------------------------------------------
# AND (composable diffusion) is refused; a subprompt weight of 1 is dropped as A1111 drops it


@pytest.mark.parametrize("prompt", ["a cat AND a dog", "a cat AND a dog:0.5", "a cat:2", "a cat : 0.5 ",
                                    "clouds, :99"])
def test_composable_diffusion_is_refused_in_one_line(prompt):
    with pytest.raises(UserError, match="composable diffusion") as e:
        prompts.conditioned_text(prompt)
    assert repr(prompt) in str(e.value)


@pytest.mark.parametrize("prompt, text", [("a cat:1", "a cat"), ("a cat : 1.0  ", "a cat"), ("a cat  ", "a cat"),
                                          ("ANDROID, LAND", "ANDROID, LAND"), ("(a:2)", "(a:2)"),
                                          ("[a:b:3]", "[a:b:3]")])
def test_prompts_without_composition_pass(prompt, text):
    assert prompts.conditioned_text(prompt) == text


def test_thousands_of_nested_brackets_are_text_not_a_traceback():
    prompt = "(" * 3000 + "[a:b:2]"
    assert prompts.prompt_schedule(prompt, 4) == [(4, prompt)]
