"""Unit tests of the agent's pure parts: settings, backoff, buffering, outputs, events."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocol.messages import JobDone, JobUpdate, NodeEvent
from runner_agent.__main__ import build_parser, settings_from_args
from runner_agent.comfyui import describe_prompt_error, queue_position
from runner_agent.config import SettingsError, load_settings
from runner_agent.connection import UpdateBuffer, backoff_delay
from runner_agent.files import guess_content_type, safe_filename
from runner_agent.node_events import EventTranslator, nodes_to_run
from runner_agent.outputs import OutputFile, collect_outputs
from runner_agent.prompt_watch import outcome_from_history

SHARED = Path("/work/shared/comfyui")

# -- settings ---------------------------------------------------------------------------------


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server_url = "http://file:1"\ntoken = "file-token"\nslots = 3\n'
        'comfyui_url = "http://file-comfy:8188"\n[comfyui_headers]\nX-Key = "secret"\n'
    )
    env = {
        "COMFYFLEET_CONFIG": str(config),
        "COMFYFLEET_SERVER": "http://env:2",
        "COMFYFLEET_AGENT_SLOTS": "2",
    }
    settings = load_settings({"slots": 5, "token": None}, environ=env)
    assert settings.server_url == "http://env:2"  # env beats file
    assert settings.token == "file-token"  # only the file has it
    assert settings.slots == 5  # the flag beats both
    assert settings.comfyui_url == "http://file-comfy:8188"
    assert settings.comfyui_headers == {"X-Key": "secret"}
    assert settings.connect_url == "ws://env:2/v1/agent/connect"


def test_settings_agent_table_in_a_shared_file(tmp_path: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text('port = 8080\n[agent]\nserver_url = "https://cp.example/base/"\ntoken = "t"\n')
    settings = load_settings({"config": str(config)}, environ={})
    assert settings.connect_url == "wss://cp.example/base/v1/agent/connect"
    assert settings.http_base_url == "https://cp.example/base"


@pytest.mark.parametrize(
    ("flags", "env", "needle"),
    [
        ({}, {"COMFYFLEET_TOKEN": "t"}, "--server URL or set COMFYFLEET_SERVER"),
        ({"server_url": "http://cp"}, {}, "--token TOKEN"),
        ({"server_url": "cp:8080", "token": "t"}, {}, "is not a http/https/ws/wss URL"),
        ({"server_url": "http://cp", "token": "t", "slots": 0}, {}, "slots must be at least 1"),
        ({"server_url": "http://cp", "token": "t"}, {"COMFYFLEET_AGENT_SLOTS": "many"}, "many"),
    ],
)
def test_settings_errors_name_the_flag_and_variable(
    flags: dict[str, object], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(flags, environ=env)


def test_settings_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('server_url = "http://cp"\ntoken = "t"\nslotz = 2\n')
    with pytest.raises(SettingsError, match="unknown setting 'slotz'"):
        load_settings({"config": str(config)}, environ={})


def test_token_file_and_header_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("cf_secret\n")
    for var in ("COMFYFLEET_SERVER", "COMFYFLEET_TOKEN", "COMFYFLEET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(
        [
            "--server",
            "http://cp:8080",
            "--token-file",
            str(token_file),
            "--comfyui-header",
            "Authorization: Bearer abc",
            "--slots",
            "2",
            "--log-json",
        ]
    )
    settings = settings_from_args(args)
    assert settings.token == "cf_secret"
    assert settings.comfyui_headers == {"Authorization": "Bearer abc"}
    assert settings.slots == 2 and settings.log_json is True
    assert "cf_secret" not in repr(settings)


# -- backoff and buffering ----------------------------------------------------------------------


def test_backoff_doubles_caps_and_jitters() -> None:
    delays = [backoff_delay(n, initial_s=0.5, max_s=30.0, jitter=0.5, rand=0.0) for n in range(10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == 30.0
    assert backoff_delay(3, initial_s=0.5, max_s=30.0, jitter=0.5, rand=0.999) == pytest.approx(4.0 * 0.5005)


def _update(n: int, status: str | None = None) -> JobUpdate:
    node = None if status else NodeEvent(node_id=str(n), event="executing")
    return JobUpdate(workflow_id="w", attempt=1, status=status, node=node)  # type: ignore[arg-type]


def test_buffer_drops_node_events_before_status_changes() -> None:
    buffer = UpdateBuffer(limit=3)
    buffer.append(_update(0, "queued"))
    for n in range(1, 5):
        buffer.append(_update(n))
    buffer.append(JobDone(workflow_id="w", attempt=1))
    kept = [buffer.popleft() for _ in range(len(buffer))]
    assert isinstance(kept[0], JobUpdate) and kept[0].status == "queued"
    assert isinstance(kept[-1], JobDone)
    assert len(kept) == 3


# -- ComfyUI answers ------------------------------------------------------------------------------


def test_prompt_error_description_from_captured_400() -> None:
    captured = json.loads((SHARED / "errors_post_prompt.json").read_text())
    body = captured["wrong_value_type"]["body"]
    text = describe_prompt_error(body["error"], body["node_errors"])
    assert text.startswith("Prompt outputs failed validation")
    assert "node 1 (EmptyImage): Failed to convert an input value to a INT value" in text


def test_queue_position_from_captured_queue() -> None:
    captured = json.loads((SHARED / "results_errors_interrupt_queue.json").read_text())
    queue = captured["queue"]["GET_/queue_before"]
    assert queue_position(queue, "0848b5c1-203a-49ff-9901-d27948eb1bfa") == "running"
    assert queue_position(queue, "79578c6b-35fe-4f3f-81d8-668a1978ba48") == "pending"
    assert queue_position(queue, "nope") is None


@pytest.mark.parametrize(
    ("name", "status", "detail_key"),
    [
        ("load_invert_scale_save", "success", None),
        ("runtime_error_regex", "error", "exception_type"),
        ("interrupt_global", "interrupted", "node_type"),
    ],
)
def test_outcome_from_captured_history(name: str, status: str, detail_key: str | None) -> None:
    history = json.loads((SHARED / "history" / f"{name}.json").read_text())
    (entry,) = history.values()
    outcome = outcome_from_history(entry)
    assert outcome is not None and outcome.status == status
    if detail_key:
        assert outcome.detail[detail_key]


def test_outcome_of_an_unfinished_entry_is_none() -> None:
    assert outcome_from_history({"prompt": [], "outputs": {}, "status": {"completed": False}}) is None


# -- outputs ------------------------------------------------------------------------------------


def test_collect_outputs_takes_every_file_like_entry_and_texts() -> None:
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
        "10": {
            "gifs": [{"filename": "b.webp", "subfolder": "x", "type": "temp", "format": "w"}],
            "animated": [True],
        },
        "11": {"video": [{"filename": "c.mp4", "subfolder": "", "type": "output"}]},
        "12": {"audio": [{"filename": "d.flac", "subfolder": "", "type": "output"}]},
        "13": {"3d": [{"filename": "e.glb"}], "text": ["hello", 42]},
        "14": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}] * 2},
    }
    files, texts = collect_outputs(outputs)
    assert [(f.node_id, f.kind, f.filename) for f in files] == [
        ("9", "images", "a.png"),
        ("10", "gifs", "b.webp"),
        ("11", "video", "c.mp4"),
        ("12", "audio", "d.flac"),
        ("13", "3d", "e.glb"),
        ("14", "images", "a.png"),
    ]
    assert files[1] == OutputFile("10", "gifs", "b.webp", "x", "temp")
    assert files[4].folder_type == "output"
    assert texts == {"13": ["hello", "42"]}


def test_file_name_helpers() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\Users\\me\\cat pic (1).png") == "cat_pic__1_.png"
    assert safe_filename("...") == "file"
    assert guess_content_type("x.png", "application/octet-stream") == "image/png"
    assert guess_content_type("x.bin", "image/webp; q=1") == "image/webp"


# -- events -------------------------------------------------------------------------------------


def _workflow() -> dict[str, object]:
    return json.loads((SHARED / "workflows" / "load_invert_scale_save.json").read_text())


def test_nodes_to_run_follows_links_from_outputs() -> None:
    prompt = _workflow()
    prompt["9"] = {"class_type": "EmptyImage", "inputs": {}}  # feeds no output: not run
    assert nodes_to_run(prompt, {"SaveImage"}) == {"1", "2", "3", "4"}
    assert nodes_to_run(prompt, None) == {"1", "2", "3", "4", "9"}


def test_translator_over_a_captured_transcript() -> None:
    prompt = _workflow()
    translator = EventTranslator(prompt, nodes_to_run(prompt, {"SaveImage"}))
    updates = []
    for line in (SHARED / "ws" / "load_invert_scale_save.jsonl").read_text().splitlines():
        msg = json.loads(line)["msg"]
        if "type" in msg:
            updates.extend(translator.translate(msg["type"], msg["data"]))
    assert updates[0].status == "running"
    events = [(u.node.event, u.node.node_id, u.node.class_type) for u in updates if u.node]
    assert events[:2] == [("executing", "1", "LoadImage"), ("executing", "2", "ImageInvert")]
    assert ("executed", "4", "SaveImage") in events
    progress = [u.progress for u in updates if u.progress is not None]
    assert progress == sorted(progress) and progress[-1] == 1.0
    # The same start and end again (from history after a lost socket) add nothing.
    assert translator.translate("execution_start", {}) == []
    assert translator.translate("execution_success", {}) == []


def test_translator_reports_cached_nodes_once_and_errors() -> None:
    prompt = _workflow()
    translator = EventTranslator(prompt, set(prompt))
    first = translator.translate("execution_cached", {"nodes": ["1", "2"], "timestamp": 5})
    assert [u.status for u in first] == ["running", None, None]
    assert [u.node.event for u in first if u.node] == ["cached", "cached"]
    assert first[-1].progress == 0.5
    assert translator.translate("execution_cached", {"nodes": ["1", "2"]}) == []
    (error,) = translator.translate(
        "execution_error", {"node_id": "3", "node_type": "ImageScale", "exception_type": "X"}
    )
    assert error.node is not None and error.node.event == "error"
    assert error.node.class_type == "ImageScale"
    assert translator.translate("execution_error", {"node_id": "3"}) == []
