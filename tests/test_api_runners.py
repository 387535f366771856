"""Runner registration over REST."""

from __future__ import annotations

from tests.conftest import ControlPlane


async def test_create_shows_token_once(cp: ControlPlane) -> None:
    created = await cp.create_runner(name="gpu-1", tags=["sdxl", "a100"])
    assert created["token"].startswith("cfr_")
    assert created["tags"] == ["sdxl", "a100"]
    assert created["status"] == "active"
    assert created["connected"] is False
    status, fetched = await cp.request("GET", f"/v1/runner/{created['id']}")
    assert status == 200
    assert "token" not in fetched
    assert fetched["name"] == "gpu-1"


async def test_list_is_paged_newest_first(cp: ControlPlane) -> None:
    for i in range(3):
        await cp.create_runner(name=f"r{i}")
    status, body = await cp.request("GET", "/v1/runner?per_page=2")
    assert status == 200
    assert body["total"] == 3
    assert [r["name"] for r in body["runners"]] == ["r2", "r1"]
    status, body = await cp.request("GET", "/v1/runner?per_page=101")
    assert status == 400
    assert "per_page" in body["message"]


async def test_update_and_delete(cp: ControlPlane) -> None:
    created = await cp.create_runner()
    status, body = await cp.request(
        "PUT", f"/v1/runner/{created['id']}", json={"status": "disabled", "tags": "x,y", "name": "renamed"}
    )
    assert status == 200
    assert (body["status"], body["tags"], body["name"]) == ("disabled", ["x", "y"], "renamed")
    status, body = await cp.request("DELETE", f"/v1/runner/{created['id']}")
    assert status == 200
    status, _ = await cp.request("GET", f"/v1/runner/{created['id']}")
    assert status == 404


async def test_bad_runner_input_is_400_with_message(cp: ControlPlane) -> None:
    status, body = await cp.request("POST", "/v1/runner", json={"name": ""})
    assert status == 400 and "name" in body["message"]
    status, body = await cp.request(
        "POST", "/v1/runner", json={"name": "x", "tags": [f"t{i}" for i in range(11)]}
    )
    assert status == 400 and "at most 10 tags" in body["message"]
    status, body = await cp.request(
        "POST",
        "/v1/runner",
        data=b"{nope",
        headers={**await cp.headers(), "Content-Type": "application/json"},
    )
    assert status == 400 and "JSON" in body["message"]
    created = await cp.create_runner()
    status, body = await cp.request("PUT", f"/v1/runner/{created['id']}", json={"status": "paused"})
    assert status == 400 and "status" in body["message"]
