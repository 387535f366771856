"""The placeholder grammar: what a client and a runner see of it."""

from __future__ import annotations

import copy
import itertools
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.placeholders import (
    ConversionError,
    Parameter,
    ParameterError,
    PlaceholderError,
    declared_parameters,
    find_placeholders,
    merge_values,
    parse_value,
    substitute,
    validate_values,
)

U64_MAX = 2**64 - 1


def node(class_type: str = "Node", **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def counter() -> Callable[[], int]:
    numbers = itertools.count(1)
    return lambda: next(numbers)


def run(workflow: dict[str, Any], values: dict[str, str] | None = None, **kwargs: Any):
    kwargs.setdefault("random_source", counter())
    kwargs.setdefault("timestamp_ms", 1_700_000_000_000)
    return substitute(workflow, values or {}, kwargs.pop("file_names", {}), **kwargs)


# -- strategies -------------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9_-]{1,40}", fullmatch=True)
# Defaults are stripped by the grammar, so a generated one carries no outer whitespace; it
# may hold commas and parentheses.
defaults = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30).filter(
    lambda s: s == s.strip()
)
options = st.lists(
    st.from_regex(r"[A-Za-z0-9._()-][A-Za-z0-9 ._()-]{0,10}[A-Za-z0-9._()-]?", fullmatch=True)
    .map(str.strip)
    .filter(bool),
    min_size=1,
    max_size=5,
    unique=True,
)
link = st.tuples(st.from_regex(r"[0-9]{1,3}", fullmatch=True), st.integers(0, 5)).map(list)
NEAR_MISSES = [
    "x$text(a)",
    "$text(a) ",
    " $text(a)",
    "$TEXT(a)",
    "$Text(a)",
    "$text (a)",
    "$text(a",
    "$text(a)x",
    "prefix_$random()",
    "$random() ",
    "$foo(x)",
    "$$text(a)",
    "text(a)",
    "$choice",
    "#choice(a, b)",
]


def is_plain(value: str) -> bool:
    try:
        return parse_value(value) is None
    except PlaceholderError:
        return False


plain_strings = st.one_of(st.sampled_from(NEAR_MISSES), st.text(max_size=30).filter(is_plain))
plain_values = st.recursive(
    st.one_of(
        plain_strings,
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.booleans(),
        st.none(),
        link,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(names, inner, max_size=3)),
    max_leaves=8,
)


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$text(prompt)", ("text", "prompt", None, ())),
        ("$text(prompt, a cat)", ("text", "prompt", "a cat", ())),
        ("$text(p,  a, b (c) )", ("text", "p", "a, b (c)", ())),
        ("$text(p,)", ("text", "p", "", ())),
        ("$choice(size, small, large)", ("choice", "size", "small", ("small", "large"))),
        ("$file(input_image)", ("file", "input_image", None, ())),
        ("$random()", ("random", None, None, ())),
        ("$timestamp()", ("timestamp", None, None, ())),
    ],
)
def test_parse_value_reads_each_kind(value: str, expected: tuple[Any, ...]) -> None:
    assert parse_value(value) == expected


@pytest.mark.parametrize("value", [*NEAR_MISSES, 12, None, ["1", 0], "", "$"])
def test_near_misses_and_non_strings_are_not_placeholders(value: object) -> None:
    assert parse_value(value) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("$text(bad name)", "name 'bad name' must match"),
        ("$text()", "name '' must match"),
        ("$text(é)", "name 'é' must match"),
        ("$text(" + "a" * 256 + ")", "must match"),
        ("$choice(size)", "$choice() needs at least one option"),
        ("$choice(size, a, , b)", "an option is empty"),
        ("$random(x)", "$random() takes no argument"),
        ("$timestamp(1)", "$timestamp() takes no argument"),
        ("$file(a, b)", "$file() takes one name"),
        ("$file()", "name '' must match"),
    ],
)
def test_malformed_placeholder_names_node_and_input(value: str, message: str) -> None:
    workflow = {"1": node(seed=1), "3": node(width=value)}
    with pytest.raises(PlaceholderError) as caught:
        find_placeholders(workflow)
    text = str(caught.value)
    assert text.startswith("node 3 input 'width': ")
    assert message in text


def test_name_of_255_characters_is_accepted() -> None:
    assert parse_value("$file(" + "n" * 255 + ")") == ("file", "n" * 255, None, ())


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        ([], "must be a JSON object of nodes"),
        ({"1": "EmptyImage"}, "node 1 must be an object"),
        ({"1": {"class_type": "EmptyImage"}}, "node 1 must have an object 'inputs'"),
        ({"1": {"class_type": "X", "inputs": ["a"]}}, "node 1 must have an object 'inputs'"),
        ({1: node()}, "node id 1 must be a string"),
    ],
)
def test_workflow_of_the_wrong_shape_is_rejected(workflow: Any, message: str) -> None:
    with pytest.raises(PlaceholderError, match=message):
        find_placeholders(workflow)


def test_find_placeholders_lists_occurrences_in_order_with_their_place() -> None:
    workflow = {
        "4": node(seed="$random()", text="$text(prompt)", other=["3", 0]),
        "9": node(image="$file(photo)", prefix="$timestamp()"),
    }
    found = [(o.kind, o.name, o.node_id, o.input_name) for o in find_placeholders(workflow)]
    assert found == [
        ("random", None, "4", "seed"),
        ("text", "prompt", "4", "text"),
        ("file", "photo", "9", "image"),
        ("timestamp", None, "9", "prefix"),
    ]


def test_placeholders_nested_in_lists_are_not_inputs() -> None:
    # Only whole input values are placeholders: a list is a link or a literal array.
    assert find_placeholders({"1": node(x=["$text(a)", 0])}) == []


# -- declared parameters ----------------------------------------------------------------


def test_declared_parameters_in_first_seen_order_with_defaults_and_requirement() -> None:
    workflow = {
        "1": node(a="$text(prompt)", b="$choice(size, small, large)", c="$random()"),
        "2": node(d="$file(photo)", e="$text(neg, ugly, blurry)"),
    }
    assert declared_parameters(workflow) == {
        "prompt": Parameter("text", "prompt", None, (), True),
        "size": Parameter("choice", "size", "small", ("small", "large"), False),
        "photo": Parameter("file", "photo", None, (), True),
        "neg": Parameter("text", "neg", "ugly, blurry", (), False),
    }
    assert list(declared_parameters(workflow)) == ["prompt", "size", "photo", "neg"]


def test_parameter_to_dict_tells_a_client_which_field_to_send() -> None:
    parameters = declared_parameters({"1": node(a="$text(p, x)", b="$choice(s, 1, 2)", c="$file(f)")})
    assert [p.to_dict() for p in parameters.values()] == [
        {
            "name": "p",
            "kind": "text",
            "field": "$p",
            "default": "x",
            "options": [],
            "required": False,
        },
        {
            "name": "s",
            "kind": "choice",
            "field": "#s",
            "default": "1",
            "options": ["1", "2"],
            "required": False,
        },
        {
            "name": "f",
            "kind": "file",
            "field": "$f",
            "default": None,
            "options": [],
            "required": True,
        },
    ]


def test_one_default_given_in_one_place_applies_to_every_use() -> None:
    workflow = {"1": node(a="$text(p)"), "2": node(b="$text(p, cat)")}
    assert declared_parameters(workflow)["p"].required is False
    result, _ = run(workflow)
    assert result["1"]["inputs"]["a"] == result["2"]["inputs"]["b"] == "cat"


def test_same_default_twice_is_fine() -> None:
    workflow = {"1": node(a="$text(p, cat)"), "2": node(b="$text(p, cat)")}
    assert declared_parameters(workflow)["p"].default == "cat"


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("$text(p, cat)", "$text(p, dog)", "default 'dog' vs 'cat'"),
        ("$text(p)", "$file(p)", "$text() there, $file() here"),
        ("$choice(p, a, b)", "$text(p, a)", "$choice() there, $text() here"),
        ("$choice(p, a, b)", "$choice(p, b, a)", "options b, a vs a, b"),
    ],
)
def test_one_name_used_inconsistently_is_an_error(first: str, second: str, message: str) -> None:
    workflow = {"1": node(a=first), "2": node(b=second)}
    with pytest.raises(PlaceholderError) as caught:
        declared_parameters(workflow)
    assert str(caught.value) == (
        f"parameter 'p' in node 2 input 'b' disagrees with node 1 input 'a': {message}"
    )


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["text", "choice", "file"]), names, st.integers(0, 4)),
        max_size=12,
        unique_by=lambda t: t[1],
    )
)
def test_every_declared_parameter_is_reported(declared: list[tuple[str, str, int]]) -> None:
    spelled = {"text": "$text({})", "choice": "$choice({}, a, b)", "file": "$file({})"}
    workflow: dict[str, Any] = {str(i): node(seed="$random()", link=["0", 0]) for i in range(5)}
    for position, (kind, name, node_index) in enumerate(declared):
        workflow[str(node_index)]["inputs"][f"in{position}"] = spelled[kind].format(name)
        # A second use of the same name in another node must not add a parameter.
        workflow[str((node_index + 1) % 5)]["inputs"][f"again{position}"] = spelled[kind].format(name)
    parameters = declared_parameters(workflow)
    assert {name: p.kind for name, p in parameters.items()} == {name: kind for kind, name, _ in declared}


# -- validating what a client sends -----------------------------------------------------

FORM = declared_parameters(
    {
        "1": node(
            prompt="$text(prompt)",
            negative="$text(negative, blurry)",
            sampler="$choice(sampler, euler, dpm_2)",
            image="$file(input_image)",
        )
    }
)


def test_validate_values_fills_defaults_and_leaves_files_out() -> None:
    values = validate_values(FORM, {"prompt": "a cat"}, {}, ["input_image"])
    assert values == {"prompt": "a cat", "negative": "blurry", "sampler": "euler"}


def test_validate_values_takes_sent_values_over_defaults() -> None:
    values = validate_values(FORM, {"prompt": "a cat", "negative": ""}, {"sampler": "dpm_2"}, ["input_image"])
    assert values == {"prompt": "a cat", "negative": "", "sampler": "dpm_2"}


PROMPT = {"prompt": "a cat"}
IMAGE = ["input_image"]


@pytest.mark.parametrize(
    ("texts", "choices", "files", "message"),
    [
        ({**PROMPT, "foo": "x"}, {}, IMAGE, "unknown parameter '$foo'"),
        (PROMPT, {"foo": "x"}, IMAGE, "unknown parameter '#foo'"),
        (PROMPT, {}, [*IMAGE, "foo"], "unknown parameter '$foo'"),
        (
            {**PROMPT, "sampler": "euler"},
            {},
            IMAGE,
            "parameter 'sampler' is a choice: send it as the field '#sampler'",
        ),
        (
            PROMPT,
            {"negative": "x"},
            IMAGE,
            "parameter 'negative' is a text: send it as the field '$negative'",
        ),
        (
            # Sent the wrong way, not missing: one message, not two.
            {**PROMPT, "input_image": "cat.png"},
            {},
            [],
            "parameter 'input_image' is a file: send it as a file part '$input_image'",
        ),
        (
            PROMPT,
            {},
            [*IMAGE, "negative"],
            "parameter 'negative' is a text: send it as the field '$negative', not as a file",
        ),
        (
            PROMPT,
            {"sampler": "ddim"},
            IMAGE,
            "'ddim' is not an option of '#sampler': choose one of euler, dpm_2",
        ),
        ({}, {}, IMAGE, "missing required parameter '$prompt'"),
        (PROMPT, {}, [], "missing required file '$input_image'"),
        ({"prompt": ["a", "cat"]}, {}, IMAGE, "value of '$prompt' must be a string, not list"),
    ],
)
def test_validate_values_explains_each_mistake(
    texts: dict[str, Any], choices: dict[str, str], files: list[str], message: str
) -> None:
    with pytest.raises(ParameterError) as caught:
        validate_values(FORM, texts, choices, files)
    assert str(caught.value) == message


def test_validate_values_reports_every_problem_at_once() -> None:
    with pytest.raises(ParameterError) as caught:
        validate_values(FORM, {"foo": "1"}, {"sampler": "ddim"}, [])
    assert caught.value.problems == [
        "unknown parameter '$foo'",
        "'ddim' is not an option of '#sampler': choose one of euler, dpm_2",
        "missing required parameter '$prompt'",
        "missing required file '$input_image'",
    ]


def test_validate_values_accepts_json_scalars_as_text() -> None:
    # The Conductor-compatible rerun's body is JSON: a number or boolean arrives as itself.
    form = declared_parameters({"1": node(a="$text(w)", b="$text(flag)", c="$text(r)")})
    assert validate_values(form, {"w": 512, "flag": True, "r": 0.5}, {}, []) == {
        "w": "512",
        "flag": "true",
        "r": "0.5",
    }


def test_merge_values_keeps_previous_and_overrides_sent() -> None:
    previous = {"prompt": "a cat", "negative": "dark", "sampler": "dpm_2"}
    merged = merge_values(FORM, previous, {"prompt": "a dog"}, {})
    assert merged == {"prompt": "a dog", "negative": "dark", "sampler": "dpm_2"}


def test_merge_values_falls_back_to_defaults_and_checks_what_is_sent() -> None:
    assert merge_values(FORM, {"prompt": "a cat"}, {}, {"sampler": "dpm_2"}) == {
        "prompt": "a cat",
        "negative": "blurry",
        "sampler": "dpm_2",
    }
    with pytest.raises(ParameterError, match=r"^unknown parameter '\$seed'$"):
        merge_values(FORM, {"prompt": "a cat"}, {"seed": "1"}, {})
    with pytest.raises(ParameterError, match="choose one of euler, dpm_2"):
        merge_values(FORM, {"prompt": "a cat"}, {}, {"sampler": "ddim"})
    with pytest.raises(ParameterError, match=r"^missing required parameter '\$prompt'$"):
        merge_values(FORM, {}, {}, {})


def test_merge_values_checks_files_sent_anew_but_never_asks_for_them() -> None:
    assert merge_values(FORM, {"prompt": "x"}, {}, {}, ["input_image"])["prompt"] == "x"
    with pytest.raises(ParameterError, match=r"unknown parameter '\$other'"):
        merge_values(FORM, {"prompt": "x"}, {}, {}, ["other"])


# -- substitution -----------------------------------------------------------------------


def test_substitute_fills_every_kind_and_records_what_it_used() -> None:
    workflow = {
        "1": node("LoadImage", image="$file(photo)"),
        "2": node("Prompt", text="$text(prompt)", style="$choice(style, oil, ink)"),
        "3": node("KSampler", seed="$random()", model=["1", 0], steps=20),
        "4": node("SaveImage", filename_prefix="$timestamp()"),
    }
    original = copy.deepcopy(workflow)
    result, resolved = run(
        workflow,
        {"prompt": "a cat"},
        file_names={"photo": "upload/cat (1).png"},
        random_source=lambda: 42,
        timestamp_ms=1234,
    )
    assert result == {
        "1": node("LoadImage", image="upload/cat (1).png"),
        "2": node("Prompt", text="a cat", style="oil"),
        "3": node("KSampler", seed=42, model=["1", 0], steps=20),
        "4": node("SaveImage", filename_prefix=1234),
    }
    assert resolved == {
        "values": {"prompt": "a cat", "style": "oil"},
        "files": {"photo": "upload/cat (1).png"},
        "random": {"3.seed": 42},
        "timestamp_ms": 1234,
    }
    assert workflow == original


def test_timestamp_is_not_recorded_when_unused() -> None:
    _, resolved = run({"1": node(seed="$random()")})
    assert "timestamp_ms" not in resolved


def test_substitute_names_what_is_missing() -> None:
    workflow = {"1": node(a="$text(p)", b="$file(f)"), "2": node(c="$text(p)")}
    with pytest.raises(ParameterError) as caught:
        run(workflow)
    assert caught.value.problems == [
        "missing required parameter '$p'",
        "missing required file '$f'",
    ]


def test_substitute_rejects_a_choice_outside_its_options() -> None:
    with pytest.raises(ParameterError, match="'huge' is not an option of '#s'"):
        run({"1": node(a="$choice(s, small, large)")}, {"s": "huge"})


TYPES = {
    "EmptyImage": {"width": "INT", "height": "INT", "color": "INT"},
    "Blur": {"sigma": "FLOAT", "enabled": "BOOLEAN", "label": "STRING", "seed": "INT"},
}


@pytest.mark.parametrize(
    ("class_type", "input_name", "sent", "expected"),
    [
        ("EmptyImage", "width", "512", 512),
        ("EmptyImage", "width", " -3 ", -3),
        ("Blur", "sigma", "0.5", 0.5),
        ("Blur", "sigma", "2", 2.0),
        ("Blur", "sigma", "1e-3", 0.001),
        ("Blur", "enabled", "TRUE", True),
        ("Blur", "enabled", "no", False),
        ("Blur", "enabled", "1", True),
        ("Blur", "label", "12", "12"),
        ("Unknown", "width", "12", "12"),
    ],
)
def test_values_become_the_type_comfyui_declares(
    class_type: str, input_name: str, sent: str, expected: object
) -> None:
    workflow = {"5": node(class_type, **{input_name: "$text(v)"})}
    result, resolved = run(workflow, {"v": sent}, input_types=TYPES)
    converted = result["5"]["inputs"][input_name]
    assert converted == expected
    assert type(converted) is type(expected)
    # What is recorded is what the client sent, so that a rerun sends it again.
    assert resolved["values"] == {"v": sent}


@pytest.mark.parametrize(
    ("input_name", "sent", "expected"),
    [
        ("width", "abc", "INT"),
        ("width", "12.0", "INT"),
        ("width", "1_000", "INT"),
        ("sigma", "nan", "FLOAT"),
        ("sigma", "inf", "FLOAT"),
        ("enabled", "maybe", "BOOLEAN"),
    ],
)
def test_a_value_that_does_not_convert_says_where_and_what(input_name: str, sent: str, expected: str) -> None:
    types = {"Any": {"width": "INT", "sigma": "FLOAT", "enabled": "BOOLEAN"}}
    with pytest.raises(ConversionError) as caught:
        run({"3": node("Any", **{input_name: "$text(v)"})}, {"v": sent}, input_types=types)
    error = caught.value
    assert (error.node_id, error.input_name, error.value, error.expected) == (
        "3",
        input_name,
        sent,
        expected,
    )
    article = "an" if expected == "INT" else "a"
    assert str(error) == f"node 3 input {input_name!r}: {sent!r} is not {article} {expected}"


def test_generated_numbers_follow_the_declared_type() -> None:
    workflow = {
        "1": node("Blur", seed="$random()", label="$timestamp()", sigma="$timestamp()"),
        "2": node("Other", seed="$random()", stamp="$timestamp()"),
    }
    result, _ = run(workflow, random_source=counter(), timestamp_ms=99, input_types=TYPES)
    assert result["1"]["inputs"] == {"seed": 1, "label": "99", "sigma": 99.0}
    # Without type information numbers stay numbers.
    assert result["2"]["inputs"] == {"seed": 2, "stamp": 99}


def test_a_random_value_outside_u64_is_refused() -> None:
    with pytest.raises(ValueError, match="not an unsigned 64-bit integer"):
        run({"1": node(seed="$random()")}, random_source=lambda: 2**64)
    result, _ = run({"1": node(seed="$random()")}, random_source=lambda: U64_MAX)
    assert result["1"]["inputs"]["seed"] == U64_MAX


def test_a_random_source_stuck_on_one_value_is_an_error_not_a_repeat() -> None:
    with pytest.raises(ValueError, match="keeps returning values already used"):
        run({"1": node(a="$random()", b="$random()")}, random_source=lambda: 7)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.from_regex(r"[0-9]{1,3}", fullmatch=True),
        st.dictionaries(names, plain_values, max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_substitution_never_touches_anything_but_placeholders(
    nodes: dict[str, dict[str, Any]],
) -> None:
    workflow = {node_id: node("X", **inputs) for node_id, inputs in nodes.items()}
    workflow["placeholders"] = node("X", seed="$random()", text="$text(t, d)")
    original = copy.deepcopy(workflow)
    result, _ = run(workflow, {"t": "new"})
    assert workflow == original
    assert result["placeholders"]["inputs"]["text"] == "new"
    del result["placeholders"], original["placeholders"]
    assert result == original


@st.composite
def parameterised_workflows(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """A workflow of random parameters, the values a client sends, and what each input must
    then hold."""
    chosen = draw(st.lists(names, min_size=1, max_size=8, unique=True))
    workflow: dict[str, Any] = {}
    sent: dict[str, str] = {}
    files: dict[str, str] = {}
    expected: dict[tuple[str, str], object] = {}
    for position, name in enumerate(chosen):
        node_id = str(position)
        kind = draw(st.sampled_from(["text", "choice", "file"]))
        if kind == "text":
            default = draw(st.none() | defaults)
            spelled = f"$text({name})" if default is None else f"$text({name}, {default})"
            if default is None or draw(st.booleans()):
                sent[name] = draw(st.text(max_size=20))
            expected[node_id, "v"] = sent.get(name, default)
        elif kind == "choice":
            offered = draw(options)
            spelled = f"$choice({name}, {', '.join(offered)})"
            if draw(st.booleans()):
                sent[name] = draw(st.sampled_from(offered))
            expected[node_id, "v"] = sent.get(name, offered[0])
        else:
            spelled = f"$file({name})"
            files[name] = draw(st.text(min_size=1, max_size=20))
            expected[node_id, "v"] = files[name]
        workflow[node_id] = node("X", v=spelled, seed="$random()", at="$timestamp()")
    return workflow, {"sent": sent, "files": files, "expected": expected}


@settings(deadline=None)
@given(parameterised_workflows(), st.integers(0, 2**63))
def test_round_trip_supplied_values_land_and_resolved_values_reproduce_the_run(
    case: tuple[dict[str, Any], dict[str, Any]], now_ms: int
) -> None:
    workflow, spec = case
    result, resolved = substitute(
        workflow,
        spec["sent"],
        spec["files"],
        random_source=lambda: secrets.randbits(64),
        timestamp_ms=now_ms,
    )
    for (node_id, input_name), value in spec["expected"].items():
        assert result[node_id]["inputs"][input_name] == value

    # The recorded values alone, with a source that would draw differently, give it back.
    again, resolved_again = substitute(
        workflow,
        resolved["values"],
        resolved["files"],
        random_source=counter(),
        timestamp_ms=resolved["timestamp_ms"],
        fixed_random=resolved["random"],
    )
    assert again == result
    assert resolved_again == resolved


@settings(deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.integers(0, U64_MAX), min_size=1, unique=True),
)
def test_random_values_are_distinct_u64_per_occurrence(count: int, pool: list[int]) -> None:
    # The source repeats every value it gives: a run must still never reuse one.
    def repeating() -> Iterator[int]:
        for value in itertools.chain(pool, range(10**6)):
            yield value
            yield value

    source = repeating()
    workflow = {str(i): node(seed="$random()", noise_seed="$random()") for i in range(count)}
    result, resolved = run(workflow, random_source=lambda: next(source))
    seeds = [inputs for n in result.values() for inputs in n["inputs"].values()]
    assert len(set(seeds)) == len(seeds) == 2 * count
    assert all(0 <= seed <= U64_MAX for seed in seeds)
    assert sorted(resolved["random"].values()) == sorted(seeds)


@settings(deadline=None)
@given(st.integers(1, 10), st.integers(0, 2**62))
def test_one_timestamp_per_run(count: int, now_ms: int) -> None:
    workflow = {str(i): node(a="$timestamp()", b="$timestamp()") for i in range(count)}
    result, resolved = run(workflow, timestamp_ms=now_ms)
    stamps = {value for n in result.values() for value in n["inputs"].values()}
    assert stamps == {now_ms}
    assert resolved["timestamp_ms"] == now_ms
