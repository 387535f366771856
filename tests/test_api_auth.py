"""Tokens: missing, invalid, expired, runner tokens on client routes, and account isolation."""

from __future__ import annotations

from datetime import timedelta

from control_plane.db.tables import utcnow
from tests.conftest import ControlPlane


async def test_missing_token_is_401_with_message(cp: ControlPlane) -> None:
    status, body = await cp.request("GET", "/v1/workflow", account=None)
    assert status == 401
    assert body == {"status": 401, "message": "missing token: send 'Authorization: Bearer <token>'"}


async def test_invalid_token_is_401(cp: ControlPlane) -> None:
    status, body = await cp.request("GET", "/v1/workflow", headers={"Authorization": "Bearer cf_nope"})
    assert (status, body["message"]) == (401, "invalid token")


async def test_expired_token_is_401(cp: ControlPlane) -> None:
    # A token that has expired (the command line makes only tokens that expire later).
    store = cp.services.store
    account = await store.get_or_create_account("alice")
    token, _ = await store.create_token(account.id, "client", utcnow() - timedelta(days=1))
    status, body = await cp.request("GET", "/v1/user", headers={"Authorization": f"Bearer {token}"})
    assert (status, body["message"]) == (401, "token expired")


async def test_x_authorization_header_is_accepted(cp: ControlPlane) -> None:
    token = await cp.token("alice")
    status, body = await cp.request("GET", "/v1/user", headers={"X-Authorization": token})
    assert status == 200
    assert body["account"]["name"] == "alice"


async def test_runner_token_cannot_act_as_a_client(cp: ControlPlane) -> None:
    runner = await cp.create_runner()
    status, _ = await cp.request(
        "GET", "/v1/workflow", headers={"Authorization": f"Bearer {runner['token']}"}
    )
    assert status == 401


async def test_user_shows_tier_limits_and_usage(cp: ControlPlane) -> None:
    token = await cp.token("bob", tier="pro")
    await cp.create_runner("bob")
    status, body = await cp.request("GET", "/v1/user", headers={"Authorization": f"Bearer {token}"})
    assert status == 200
    assert body["tier"] == "pro"
    assert body["limits"]["max_parameters"] == 100
    assert body["usage"] == {"workflows_last_24h": 0, "runners": 1, "runners_connected": 0}


async def test_other_accounts_runner_is_404(cp: ControlPlane) -> None:
    runner = await cp.create_runner("alice")
    status, body = await cp.request("GET", f"/v1/runner/{runner['id']}", account="mallory")
    assert status == 404
    assert "not found" in body["message"]
    status, _ = await cp.request("DELETE", f"/v1/runner/{runner['id']}", account="mallory")
    assert status == 404


async def test_healthz_says_which_database_it_runs_on(cp: ControlPlane, database_url: str) -> None:
    status, body = await cp.request("GET", "/healthz", account=None)
    assert status == 200
    assert body["database"] == ("postgresql" if database_url else "sqlite")
