"""The agent removes a job's files from its ComfyUI's folders once the control plane has
acknowledged the job (``--comfyui-dir``, ComfyUI on the same host), and only those."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner_agent.comfyui_files import output_paths
from runner_agent.config import AgentSettings, SettingsError
from runner_agent.job_folder import SavedOutput
from tests.conftest import AgentFactory, ControlPlane, png_bytes, poll_until
from tests.test_e2e import WORKFLOW, submit


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


async def test_an_acknowledged_jobs_inputs_and_outputs_leave_comfyuis_folders(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, tmp_path: Path
) -> None:
    comfyui = tmp_path / "comfyui"  # the simulator's folder (the sim fixture's)
    runner = await cp.create_runner()
    agent = await start_agent(cp.base, runner["token"], sim, comfyui_dirs=(str(comfyui),))
    unrelated = comfyui / "output" / "someone_elses.png"
    unrelated.write_bytes(b"not the job's")

    wf = await submit(cp, WORKFLOW, **{"$prompt": "tidy", "$input_image": png_bytes((1, 2, 3))})
    done = await cp.wait_for_status(wf["id"], {"completed"})
    assert done["status"] == "completed"

    async def tidied() -> bool:
        jobs = agent.jobs_root
        return not files_under(comfyui / "input" / "comfyfleet") and not files_under(jobs)

    await poll_until(tidied, timeout_s=30)
    assert files_under(comfyui / "output") == [unrelated]
    # What went from ComfyUI's disk is on the control plane: every output downloads.
    _, listing = await cp.request("GET", f"/v1/workflow/{wf['id']}/outputs")
    assert len(listing["outputs"]) == 2
    for output in listing["outputs"]:
        status, body = await cp.request("GET", output["src"])
        assert status == 200 and len(body) == output["size"]


async def test_without_comfyui_dir_the_files_stay_where_comfyui_put_them(
    cp: ControlPlane, sim: str, start_agent: AgentFactory, tmp_path: Path
) -> None:
    comfyui = tmp_path / "comfyui"
    runner = await cp.create_runner()
    agent = await start_agent(cp.base, runner["token"], sim)
    wf = await submit(cp, WORKFLOW, **{"$prompt": "kept", "$input_image": png_bytes((4, 5, 6))})
    assert (await cp.wait_for_status(wf["id"], {"completed"}))["status"] == "completed"

    async def acknowledged() -> bool:  # the agent's own job folder goes at the ack
        return not files_under(agent.jobs_root)

    await poll_until(acknowledged, timeout_s=30)
    assert len(files_under(comfyui / "input" / "comfyfleet")) == 1
    assert len(files_under(comfyui / "output")) == 2


def test_only_files_inside_comfyuis_output_and_temp_folders_are_ever_named(tmp_path: Path) -> None:
    def output(filename: str, subfolder: str = "", folder_type: str = "output") -> SavedOutput:
        return SavedOutput(
            "9", "images", filename, "image/png", "0" * 64, 1, "outputs/0.bin", subfolder, folder_type
        )

    named = output_paths(
        tmp_path,
        [
            output("a.png"),
            output("b.png", "sub", "temp"),
            output("passwd", "../../etc"),  # out of the folder
            output("..", ""),  # the folder itself's parent
            output("photo.png", "", "input"),  # someone's input, not the job's output
        ],
    )
    assert named == [
        (tmp_path / "output" / "a.png").resolve(),
        (tmp_path / "temp" / "sub" / "b.png").resolve(),
    ]


def test_one_comfyui_dir_per_instance_or_none() -> None:
    with pytest.raises(SettingsError, match=r"comfyui_dirs \(--comfyui-dir\) has 1 folder\(s\) for 2"):
        AgentSettings(
            server_url="http://cp:8080",
            token="t",
            comfyui_urls=("http://127.0.0.1:8188", "http://127.0.0.1:8189"),
            comfyui_dirs=("/srv/comfyui",),
        ).validate()
