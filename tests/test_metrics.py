"""/metrics, read back with prometheus-client's own parser: for operators only, an account's
operator token showing its own account, an admin token every account; runners by name."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from runner_agent.capacity import NvmlProbe
from tests.conftest import AgentFactory, ControlPlane
from tests.fake_nvml import FakeNvml, h100
from tests.test_e2e import curl_form

TRIVIAL = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "m"}},
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(cp: ControlPlane, token: str | None) -> tuple[int, Samples, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with cp.http.get(f"{cp.base}/metrics", headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            return resp.status, {}, text
        assert resp.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return 200, samples, text


def get(samples: Samples, name: str, **labels: str) -> Any:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_reflect_the_fleet_and_show_each_operator_only_their_own(
    cp: ControlPlane, sim: str, start_agent: AgentFactory
) -> None:
    runner = await cp.create_runner(name="gpu-box", tags=["gpu", "sdxl"])
    await cp.create_runner(name="offline", tags=["cold"])
    await start_agent(cp.base, runner["token"], sim, nvml=NvmlProbe(FakeNvml([h100(0, 40, 10, 50, 300)])))
    status, body = await cp.request("POST", "/v1/workflow", data=curl_form(TRIVIAL, tags="gpu"))
    assert status == 201
    done = await cp.wait_for_status(body["id"], {"completed", "failed"})
    assert done["status"] == "completed"
    status, _ = await cp.request("POST", "/v1/workflow", data=curl_form(TRIVIAL, tags="cold"))
    assert status == 201
    bobs = await cp.create_runner(account="bob", name="bobs-box", tags=["secret-tag"])
    await start_agent(cp.base, bobs["token"], sim)
    await cp.services.fleet.wait_for(lambda: len(cp.services.registry.all()) == 2, timeout_s=10)

    status, alice, text = await scrape(cp, await cp.token("alice", scope="operator"))
    assert status == 200
    assert get(alice, "comfyfleet_runners_online", account="alice") == 1
    assert get(alice, "comfyfleet_gpu_utilization_percent", account="alice", runner="gpu-box", gpu="0") == 40
    assert get(alice, "comfyfleet_workflows", account="alice", status="completed") == 1
    assert get(alice, "comfyfleet_workflows", account="alice", status="accepted") == 1
    assert get(alice, "comfyfleet_queue_length", account="alice") == 1
    assert get(alice, "comfyfleet_queue_oldest_age_seconds", account="alice") > 0
    assert get(alice, "comfyfleet_dispatch_latency_seconds_count", account="alice") == 1
    assert get(alice, "comfyfleet_execution_duration_seconds_count", account="alice") == 1
    assert get(alice, "comfyfleet_execution_duration_seconds_sum", account="alice") > 0
    # Nothing of bob's, and no tags or runner ids at all.
    for secret in ("bob", "bobs-box", "secret-tag", bobs["id"], runner["id"], "sdxl"):
        assert secret not in text

    status, every, _ = await scrape(cp, await cp.token("root", scope="admin"))
    assert status == 200
    assert get(every, "comfyfleet_runners_online", account="alice") == 1
    assert get(every, "comfyfleet_runners_online", account="bob") == 1
    assert get(every, "comfyfleet_workflows", account="alice", status="completed") == 1


async def test_metrics_need_an_operator_token(cp: ControlPlane) -> None:
    status, _, text = await scrape(cp, None)
    assert status == 401 and "missing token" in text
    status, _, text = await scrape(cp, await cp.token("alice"))
    assert status == 403 and "this needs an operator token" in text
    runner = await cp.create_runner()
    status, _, _ = await scrape(cp, runner["token"])
    assert status == 401
