"""/metrics, read back with prometheus-client's own parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import AgentFactory, ControlPlane
from tests.test_e2e import seed_form

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
}


async def scrape(cp: ControlPlane) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with cp.http.get(f"{cp.base}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_reflect_the_fleet(cp: ControlPlane, sim: str, start_agent: AgentFactory) -> None:
    runner = await cp.create_runner(tags=["gpu", "sdxl"])
    await cp.create_runner(name="offline", tags=["cold"])
    await start_agent(cp.base, runner["token"], sim)
    status, body = await cp.request("POST", "/v1/workflow", data=seed_form(TRIVIAL, tags="gpu"))
    assert status == 201
    done = await cp.wait_for_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed"
    status, _ = await cp.request("POST", "/v1/workflow", data=seed_form(TRIVIAL, tags="cold"))
    assert status == 201

    samples = await scrape(cp)

    def get(name: str, **labels: str) -> Any:
        return samples.get((name, tuple(sorted(labels.items()))))

    assert get("comfyfleet_runners_online", tag="gpu") == 1
    assert get("comfyfleet_runners_online", tag="sdxl") == 1
    assert get("comfyfleet_runners_online", tag="cold") is None
    assert get("comfyfleet_workflows", status="completed") == 1
    assert get("comfyfleet_workflows", status="accepted") == 1
    assert get("comfyfleet_queue_length") == 1
    assert get("comfyfleet_queue_oldest_age_seconds") > 0
    assert get("comfyfleet_dispatch_latency_seconds_count") == 1
    assert get("comfyfleet_execution_duration_seconds_count") == 1
    assert get("comfyfleet_execution_duration_seconds_sum") > 0
