"""Unit tests of the agent's pure parts: settings, backoff, buffering, outputs, events,
instance choice and log lines."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

from protocol.messages import Job, JobDone, JobUpdate, NodeEvent
from runner_agent.__main__ import _JsonFormatter, build_parser, settings_from_args
from runner_agent.capacity import devices_of_instances
from runner_agent.comfyui import describe_prompt_error, queue_position, running_prompt_ids
from runner_agent.config import SettingsError, load_settings
from runner_agent.connection import UpdateBuffer, backoff_delay
from runner_agent.control_files import ControlPlaneFiles
from runner_agent.executor import JobExecution
from runner_agent.files import guess_content_type, safe_filename
from runner_agent.instances import (
    ComfyUIInstance,
    build_instances,
    choose_instance,
    healthy_free_slots,
    unhealthy_reason,
)
from runner_agent.job_folder import JobFolder
from runner_agent.node_events import EventTranslator, nodes_to_run
from runner_agent.outputs import OutputFile, collect_outputs
from runner_agent.prompt_watch import outcome_from_history

CAPTURED = Path(__file__).resolve().parent / "fixtures" / "comfyui"

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
        ({"server_url": "http://a:1,cp:2", "token": "t"}, {}, "'cp:2' is not a http/https/ws/wss URL"),
        ({"server_url": "http://a:1, http://a:1", "token": "t"}, {}, "lists a URL twice"),
        ({"server_url": " , ", "token": "t"}, {}, "--server URL or set COMFYFLEET_SERVER"),
    ],
)
def test_settings_errors_name_the_flag_and_variable(
    flags: dict[str, object], env: dict[str, str], needle: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(flags, environ=env)


def test_settings_several_control_planes_in_the_order_given() -> None:
    settings = load_settings(
        {"token": "t"}, environ={"COMFYFLEET_SERVER": "https://cp1.example/, https://cp2.example/base"}
    )
    assert settings.server_urls == ("https://cp1.example/", "https://cp2.example/base")
    assert settings.connect_url == "wss://cp1.example/v1/agent/connect"  # the first is dialled first


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
    captured = json.loads((CAPTURED / "errors_post_prompt.json").read_text())
    body = captured["wrong_value_type"]["body"]
    text = describe_prompt_error(body["error"], body["node_errors"])
    assert text.startswith("Prompt outputs failed validation")
    assert "node 1 (EmptyImage): Failed to convert an input value to a INT value" in text


def test_queue_position_from_captured_queue() -> None:
    captured = json.loads((CAPTURED / "results_errors_interrupt_queue.json").read_text())
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
    history = json.loads((CAPTURED / "history" / f"{name}.json").read_text())
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
    return json.loads((CAPTURED / "workflows" / "load_invert_scale_save.json").read_text())


def test_nodes_to_run_follows_links_from_outputs() -> None:
    prompt = _workflow()
    prompt["9"] = {"class_type": "EmptyImage", "inputs": {}}  # feeds no output: not run
    assert nodes_to_run(prompt, {"SaveImage"}) == {"1", "2", "3", "4"}
    assert nodes_to_run(prompt, None) == {"1", "2", "3", "4", "9"}


def test_translator_over_a_captured_transcript() -> None:
    prompt = _workflow()
    translator = EventTranslator(prompt, nodes_to_run(prompt, {"SaveImage"}))
    updates = []
    for line in (CAPTURED / "ws" / "load_invert_scale_save.jsonl").read_text().splitlines():
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


# -- several ComfyUI instances ------------------------------------------------------------------


def test_repeated_comfyui_flags_make_instances_with_gpus_and_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("COMFYFLEET_SERVER", "COMFYFLEET_TOKEN", "COMFYFLEET_CONFIG", "COMFYFLEET_COMFYUI"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(
        [
            "--server",
            "http://cp:8080",
            "--token",
            "t",
            "--comfyui",
            "http://127.0.0.1:8188",
            "--comfyui",
            "http://127.0.0.1:8189/",
            "--comfyui-gpu",
            "2",
            "--comfyui-gpu",
            "3",
            "--comfyui-cmd",
            "python main.py --port 8188 --cuda-device 2",
            "--comfyui-cmd",
            "python 'my main.py' --port 8189 --cuda-device 3",
            "--slots",
            "2",
            "--shutdown-grace-s",
            "12.5",
        ]
    )
    settings = settings_from_args(args)
    assert settings.comfyui_urls == ("http://127.0.0.1:8188", "http://127.0.0.1:8189/")
    assert settings.comfyui_url == "http://127.0.0.1:8188"
    assert settings.comfyui_gpus == (2, 3)
    assert settings.comfyui_cmds[1] == "python 'my main.py' --port 8189 --cuda-device 3"
    # --slots is per instance.
    assert (settings.slots, settings.total_slots) == (2, 4)
    assert settings.shutdown_grace_s == 12.5


def test_single_comfyui_defaults(tmp_path: Path) -> None:
    settings = load_settings({"server_url": "http://cp", "token": "t"}, environ={})
    assert settings.comfyui_urls == ("http://127.0.0.1:8188",)
    assert settings.comfyui_gpus == (0,)
    assert settings.comfyui_cmds == ()
    assert settings.total_slots == 1


def test_comfyui_urls_from_file_env_and_flags_replace_each_other(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server_url = "http://cp"\ntoken = "t"\n'
        'comfyui_urls = ["http://a:1", "http://b:2"]\ncomfyui_gpus = [4, 5]\n'
    )
    from_file = load_settings({"config": str(config)}, environ={})
    assert (from_file.comfyui_urls, from_file.comfyui_gpus) == (("http://a:1", "http://b:2"), (4, 5))
    # A single URL in the environment replaces the file's list (its GPUs go with a flag).
    from_env = load_settings(
        {"config": str(config), "comfyui_gpus": (0,)}, environ={"COMFYFLEET_COMFYUI": "http://c:3"}
    )
    assert from_env.comfyui_urls == ("http://c:3",)
    as_json = load_settings(
        {"config": str(config)},
        environ={"COMFYFLEET_AGENT_COMFYUI_URLS": '["http://d:4", "http://e:5"]'},
    )
    assert as_json.comfyui_urls == ("http://d:4", "http://e:5")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"comfyui_urls": ("http://a:1", "http://a:1")}, "lists a URL twice"),
        ({"comfyui_urls": ("http://a:1", "ftp://b")}, "is not a http/https URL"),
        ({"comfyui_urls": ("http://a:1", "http://b:2"), "comfyui_gpus": (0,)}, "names 1 GPU(s) for 2"),
        ({"comfyui_gpus": (-1,)}, "must not be negative"),
        ({"comfyui_urls": ("http://a:1", "http://b:2"), "comfyui_cmds": ("x",)}, "1 command(s) for 2"),
        ({"comfyui_cmds": ("python 'unclosed",)}, "cannot split"),
        ({"comfyui_cmds": ("   ",)}, "an empty command"),
        ({"comfyui_stop_grace_s": -1.0}, "comfyui_stop_grace_s must not be negative"),
        ({"stats_timeout_s": 0.0}, "stats_timeout_s must be positive"),
    ],
)
def test_instance_settings_errors(changes: dict[str, object], needle: str) -> None:
    flags: dict[str, object] = {"server_url": "http://cp", "token": "t", **changes}
    with pytest.raises(SettingsError, match=re.escape(needle)):
        load_settings(flags, environ={})


def test_comfyui_url_and_urls_together_are_an_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'server_url = "http://cp"\ntoken = "t"\ncomfyui_url = "http://a:1"\ncomfyui_urls = []\n'
    )
    with pytest.raises(SettingsError, match="set comfyui_urls or comfyui_url, not both"):
        load_settings({"config": str(config)}, environ={})
    env = {"COMFYFLEET_COMFYUI": "http://a:1", "COMFYFLEET_AGENT_COMFYUI_URLS": "http://b:2"}
    with pytest.raises(SettingsError, match="not both"):
        load_settings({"server_url": "http://cp", "token": "t"}, environ=env)
    bad_gpus = {"COMFYFLEET_AGENT_COMFYUI_GPUS": "[1,"}
    with pytest.raises(SettingsError, match=re.escape("environment COMFYFLEET_AGENT_COMFYUI_GPUS")):
        load_settings({"server_url": "http://cp", "token": "t"}, environ=bad_gpus)
    with pytest.raises(SettingsError, match="comfyui_gpus = 'one' is not valid"):
        load_settings(
            {"server_url": "http://cp", "token": "t"}, environ={"COMFYFLEET_AGENT_COMFYUI_GPUS": "one"}
        )


def test_devices_of_instances_renumber_each_instance_gpu() -> None:
    cuda = {"name": "cuda:0 NVIDIA L4", "type": "cuda", "index": 0, "vram_total": 10, "vram_free": 5}
    cpu = {"name": "cpu", "type": "cpu", "index": None}
    merged = devices_of_instances([(1, [cpu, cuda]), (0, [cuda]), (3, None), (1, [cuda])])
    assert merged == [{**cuda, "index": 0}, {**cuda, "index": 1}]
    assert devices_of_instances([(0, None), (1, None)]) is None
    assert devices_of_instances([(0, [cpu])]) == []


def _job(workflow_id: str) -> Job:
    return Job(workflow_id=workflow_id, attempt=1, workflow_json={})


async def test_jobs_go_to_free_healthy_instances_least_loaded_first(tmp_path: Path) -> None:
    settings = load_settings(
        {
            "server_url": "http://cp",
            "token": "t",
            "comfyui_urls": ("http://a:1", "http://b:2", "http://c:3"),
            "data_dir": str(tmp_path),
        },
        environ={},
    )
    files = ControlPlaneFiles(settings.http_base_url, settings.token)
    a, b, c = build_instances(settings, files, lambda number, reason: None)
    instances = [a, b, c]

    async def send(message: object) -> None:
        return None

    def place(instance: ComfyUIInstance, workflow_id: str) -> JobExecution:
        folder = JobFolder(tmp_path / "jobs", workflow_id, 1)
        execution = JobExecution(_job(workflow_id), instance.deps, send, folder)
        instance.jobs[execution.key] = execution
        return execution

    assert choose_instance(instances) is a  # a tie: the first listed
    place(a, "w1")
    assert choose_instance(instances) is b
    c.answer_error = "refused"
    assert not c.healthy and "http://c:3 does not answer: refused" in (unhealthy_reason(instances) or "")
    place(b, "w2")
    # c has the only free slot but is down: no slot is offered, and the job is queued on a.
    assert healthy_free_slots(instances) == 0
    assert choose_instance(instances) is a
    finished = place(b, "w3")
    finished.abandon()  # an abandoned job no longer holds its slot
    assert (b.active, b.free, b.busy_workflow_id) == (1, 0, "w2")
    a.answer_error = b.answer_error = "refused"
    assert choose_instance(instances) is c  # nothing healthy: the least loaded of all
    assert c.state()["healthy"] is False and a.state()["busy_workflow_id"] == "w1"


def test_running_prompt_ids_from_captured_queue() -> None:
    captured = json.loads((CAPTURED / "results_errors_interrupt_queue.json").read_text())
    queue = captured["queue"]["GET_/queue_before"]
    assert running_prompt_ids(queue) == ["0848b5c1-203a-49ff-9901-d27948eb1bfa"]
    assert running_prompt_ids({}) == []


def test_json_log_lines_are_one_object_each() -> None:
    formatter = _JsonFormatter()
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("runner_agent.x").makeRecord(
            "runner_agent.x", logging.ERROR, __file__, 1, "workflow %s: %s", ("wf-1", "a\nb"), sys.exc_info()
        )
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "workflow wf-1: a\nb" and entry["level"] == "ERROR"
    assert entry["logger"] == "runner_agent.x" and "ValueError: bad" in entry["exception"]
