"""Fuzzing with hypothesis (fixed seed, bounded examples): whatever bytes arrive as a form, the
control plane answers with JSON and a 4xx or a 201, never a 5xx, and stores nothing for a
refusal; whatever text sits in a workflow's inputs, the placeholder grammar either reads it
or says what is wrong with it, never anything else."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from comfyfleet.admin import create_token
from protocol.placeholders import (
    ConversionError,
    ParameterError,
    PlaceholderError,
    find_placeholders,
    parse_value,
    substitute,
)
from tests.conftest import start_control_plane
from tests.test_faults import SLOW

FIELD_NAMES = st.one_of(
    st.sampled_from(
        ["name", "tags", "workflow_json", "correlation_id", "timeout_s", "$w", "#c", "", "$", "#"]
    ),
    st.text(min_size=0, max_size=20),
)
HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=30)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """Bodies from well formed to broken: parts with odd names, file names and headers,
    truncated anywhere, or with a boundary that does not match."""
    boundary = draw(st.sampled_from(["b", "xyz123", "----WebKitFormBoundary7MA4YWxkTrZu0gW"]))
    chunks = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(FIELD_NAMES).replace('"', "")
        disposition = f'form-data; name="{name}"'
        if draw(st.booleans()):
            disposition += f'; filename="{draw(HEADER_TEXT).replace(chr(34), "")}"'
        headers = f"Content-Disposition: {disposition}\r\n"
        if draw(st.booleans()):
            headers += f"Content-Type: {draw(HEADER_TEXT)}\r\n"
        value = draw(st.one_of(st.binary(max_size=60), st.just(json.dumps(SLOW).encode())))
        chunks.append(
            f"--{boundary}\r\n".encode()
            + headers.encode("utf-8", "surrogatepass")
            + b"\r\n"
            + value
            + b"\r\n"
        )
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    cut = draw(st.integers(0, len(body)))
    body = body[:cut] if draw(st.booleans()) else body
    declared = draw(st.sampled_from([boundary, boundary + "x", ""]))
    return body, f"multipart/form-data; boundary={declared}" if declared else "multipart/form-data"


async def test_no_form_of_any_shape_gets_a_server_error(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    runner, base, _, cp_settings = await start_control_plane(tmp_path)
    try:
        token = await create_token(cp_settings, "fuzz", "enterprise", "client", None)
        auth = {"Authorization": f"Bearer {token}"}
        async with http.post(f"{base}/v1/runner", json={"name": "r"}, headers=auth) as resp:
            assert resp.status == 201
        answers: list[tuple[int, Any]] = []

        @seed(20261201)
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(multipart_bodies())
        def one(case: tuple[bytes, str]) -> None:
            body, content_type = case
            answers.append(asyncio.run_coroutine_threadsafe(post(body, content_type), loop).result(30))

        async def post(body: bytes, content_type: str) -> tuple[int, Any]:
            headers = {**auth, "Content-Type": content_type}
            async with http.post(f"{base}/v1/workflow", data=body, headers=headers) as resp:
                assert resp.content_type == "application/json", await resp.text()
                return resp.status, await resp.json()

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(one)
        assert answers and all(status in (201, 400, 403) for status, _ in answers), {s for s, _ in answers}
        assert all("message" in answer for status, answer in answers if status != 201)
        refused = sum(1 for status, _ in answers if status != 201)
        async with http.get(f"{base}/v1/workflow", headers=auth) as resp:
            total = (await resp.json())["total"]
        assert total == len(answers) - refused  # a refused form stores nothing
    finally:
        await runner.cleanup()


PLACEHOLDER_LIKE = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda kind, inner: f"${kind}({inner})",
        st.sampled_from(["text", "choice", "file", "random", "timestamp", "TEXT", "foo"]),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    ),
)


@seed(20261201)
@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.text(max_size=5), PLACEHOLDER_LIKE, max_size=6),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
def test_the_placeholder_grammar_reads_any_text_or_says_what_is_wrong(
    inputs: dict[str, str], values: dict[str, str]
) -> None:
    for value in inputs.values():
        try:
            parse_value(value)
        except PlaceholderError as exc:
            assert str(exc)
    workflow = {"1": {"class_type": "X", "inputs": inputs}}
    try:
        find_placeholders(workflow)
        substitute(workflow, values, {}, random_source=lambda: 7, timestamp_ms=1)
    except (PlaceholderError, ParameterError, ConversionError) as exc:
        assert str(exc)
