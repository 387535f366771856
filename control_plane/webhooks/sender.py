"""The sender: a background task on every control plane that turns the outbox's changes into
deliveries and sends those whose time has come, at least once each, never from a request's
or an agent report's path.

A delivery is claimed for one attempt (put off by a lease, so that no other control plane
takes it meanwhile and so that it is tried again if this one dies mid-send), sent outside any
transaction, and its answer recorded: a 2xx delivers it; anything else tries it again after
``webhook_backoff_s``, doubled per attempt up to ``webhook_max_backoff_s``, until it is
``webhook_give_up_s`` old. Each attempt is signed afresh (receivers refuse old timestamps);
the ``webhook-id`` stays, by which receivers drop a repeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import aiohttp

from control_plane.db.tables import (
    Output,
    WebhookChange,
    WebhookDelivery,
    WebhookEndpoint,
    Workflow,
    as_utc,
    utcnow,
)
from control_plane.db.webhooks import Due, Outcome, WebhookStore
from control_plane.public_addresses import PublicOnly, Refused, private_literal
from control_plane.settings import Settings
from control_plane.webhooks import events
from control_plane.webhooks.signing import signed_headers

log = logging.getLogger(__name__)
_BATCH = 50
_MIN_ROUND_S = 0.05
# What of a receiver's answer is kept in the attempt log.
_ANSWER_CHARS = 200


class WebhookSender:
    def __init__(self, settings: Settings, store: WebhookStore) -> None:
        self.settings = settings
        self.store = store
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook sender")

    async def stop(self) -> None:
        # The flag as well as the cancel: a cancel that lands as the task's wait ends can be
        # lost, and then only the flag ends the loop.
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """Something may have been written to the outbox: look now, not at the next poll."""
        self._wake.set()

    async def runner_offline(self, runner_id: str, requeued: list[str]) -> None:
        """A runner did not come back within its grace period (announced by the one control
        plane whose grace period it was)."""
        found = await self.store.runner_and_endpoints(runner_id)
        if found is None:
            return
        runner, endpoints = found
        view = {"id": runner.id, "name": runner.name, "tags": runner.tags}
        await self.store.add_deliveries(events.runner_offline(runner.account_id, view, requeued, endpoints))
        self.wake()

    async def _run(self) -> None:
        resolver = None if self.settings.webhook_private_urls else PublicOnly()
        connector = (
            aiohttp.TCPConnector(resolver=resolver) if resolver is not None else aiohttp.TCPConnector()
        )
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            while not self._stopping:
                try:
                    await self._round(http)
                except Exception:  # the database away, say: the next round tries again
                    log.exception("webhook round failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.webhook_poll_s):
                        await self._wake.wait()
                self._wake.clear()
                # The pace of rounds: a burst of status changes (hundreds a second on a busy
                # fleet) makes one round, not one each, on the database the fleet needs.
                await asyncio.sleep(_MIN_ROUND_S)

    async def _round(self, http: aiohttp.ClientSession) -> None:
        while await self.store.expand(self._plan, _BATCH) == _BATCH:
            pass
        lease_s = 2 * self.settings.webhook_timeout_s + 5
        while True:
            due = await self.store.claim_due(utcnow(), _BATCH, lease_s)
            await asyncio.gather(*(self._attempt(http, d) for d in due if d.dropped is None))
            for d in due:
                if d.dropped is not None:
                    log.info("webhook %s to %s dropped: %s", d.delivery.id, d.delivery.url, d.dropped)
            if len(due) < _BATCH:
                return

    def _plan(
        self,
        change: WebhookChange,
        workflow: Workflow,
        outputs: list[Output],
        endpoints: list[WebhookEndpoint],
    ) -> list[WebhookDelivery]:
        return events.deliveries_of(change, workflow, outputs, endpoints, self.settings.base_url)

    async def _attempt(self, http: aiohttp.ClientSession, due: Due) -> None:
        delivery = due.delivery
        assert due.secret is not None
        now = utcnow()
        headers = signed_headers(due.secret, delivery.id, delivery.payload, now)
        headers |= {"Content-Type": "application/json", "User-Agent": "comfyfleet-webhooks"}
        started = time.monotonic()
        outcome = await self._post(http, delivery.url, delivery.payload, headers, now, started)
        retry_at = self._retry_at(delivery, outcome)
        await self.store.record(delivery, outcome, retry_at, self.settings.webhook_disable_after_s)
        if outcome.delivered:
            log.info("webhook %s (%s) delivered to %s", delivery.id, delivery.event_type, delivery.url)
        else:
            later = f"again at {retry_at.isoformat()}" if retry_at is not None else "given up on"
            log.warning("webhook %s to %s failed (%s); %s", delivery.id, delivery.url, outcome.error, later)

    async def _post(
        self,
        http: aiohttp.ClientSession,
        url: str,
        body: str,
        headers: dict[str, str],
        now: datetime,
        started: float,
    ) -> Outcome:
        def ended(status: int | None, error: str | None, answer: str = "") -> Outcome:
            return Outcome(
                now, status, error, answer[:_ANSWER_CHARS], int((time.monotonic() - started) * 1000)
            )

        if not self.settings.webhook_private_urls:
            literal = private_literal(url)
            if literal is not None:
                return ended(None, f"refused: {literal} is not a public address (webhook_private_urls)")
        try:
            async with http.post(url, data=body.encode(), headers=headers, allow_redirects=False) as resp:
                answer = (await resp.content.read(_ANSWER_CHARS * 4)).decode(errors="replace")
                error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
                return ended(resp.status, error, answer)
        except TimeoutError:
            return ended(None, f"no answer within {self.settings.webhook_timeout_s:g} s")
        except (aiohttp.ClientError, Refused) as exc:
            return ended(None, _reason(exc))

    def _retry_at(self, delivery: WebhookDelivery, outcome: Outcome) -> datetime | None:
        if outcome.delivered:
            return None
        pause = min(
            self.settings.webhook_max_backoff_s, self.settings.webhook_backoff_s * 2**delivery.attempts
        )
        at = outcome.at + timedelta(seconds=pause)
        if (at - as_utc(delivery.created_at)).total_seconds() > self.settings.webhook_give_up_s:
            return None
        return at


def _reason(exc: Any) -> str:
    text = str(exc) or type(exc).__name__
    if "is not a public" in text or isinstance(getattr(exc, "os_error", None), Refused):
        return f"refused: {text}"
    return text
