"""The asyncio client: :class:`Client`'s calls, awaited, on one ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import httpx

from comfyfleet.client import calls
from comfyfleet.client.calls import Call, FileSource, Value, WorkflowSource
from comfyfleet.client.errors import ConnectionFailed, error_for
from comfyfleet.client.events import Event, Resume, SseParser
from comfyfleet.client.outputs import part_path, target_path
from comfyfleet.client.transport import (
    DEFAULT_TIMEOUT,
    JSON,
    base_headers,
    checked,
    decoded,
    normalise_server,
    request_args,
    stream_timeout,
    unreachable,
)


class AsyncClient:
    """``AsyncClient("http://127.0.0.1:8080", token)``; ``async with`` it, or ``await aclose()``."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.server = normalise_server(server)
        self._http = httpx.AsyncClient(
            base_url=self.server, headers=base_headers(token), timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, **request_args(call))
        except httpx.TransportError as exc:
            raise unreachable(self.server, exc) from exc

    async def _call(self, call: Call) -> Any:
        return decoded(await self._send(call))

    # --- workflows -------------------------------------------------------------------

    async def submit(
        self,
        workflow: WorkflowSource,
        *,
        params: Mapping[str, Value] | None = None,
        files: Mapping[str, FileSource] | None = None,
        choices: Mapping[str, str] | None = None,
        tags: str | Iterable[str] | None = None,
        name: str | None = None,
        timeout_s: int | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        """Submit ``workflow`` (a dict, or a path to its JSON) with its ``$text`` ``params``,
        ``$file`` ``files`` (paths or bytes) and ``#choice`` ``choices``; the new workflow."""
        call = calls.submit(
            workflow,
            params=params,
            files=files,
            choices=choices,
            tags=tags,
            name=name,
            timeout_s=timeout_s,
            correlation_id=correlation_id,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        return cast(JSON, await self._call(call))

    async def get_workflow(self, workflow_id: str) -> JSON:
        """The workflow with its current tasks, queue position and reruns."""
        return cast(JSON, await self._call(calls.get_workflow(workflow_id)))

    async def list_workflows(
        self,
        *,
        status: str | None = None,
        tag: str | None = None,
        parent_id: str | None = None,
        correlation_id: str | None = None,
        page: int = 1,
        per_page: int = 10,
    ) -> JSON:
        """``{"workflows": [...], "total": N}``, newest first."""
        call = calls.list_workflows(
            status=status,
            tag=tag,
            parent_id=parent_id,
            correlation_id=correlation_id,
            page=page,
            per_page=per_page,
        )
        return cast(JSON, await self._call(call))

    async def tasks(self, workflow_id: str, attempt: int | None = None) -> JSON:
        return cast(JSON, await self._call(calls.tasks(workflow_id, attempt)))

    async def cancel(self, workflow_id: str) -> JSON:
        return cast(JSON, await self._call(calls.cancel(workflow_id)))

    async def delete_workflow(self, workflow_id: str) -> None:
        """Delete a finished workflow with its outputs (a ``Conflict`` until it has finished)."""
        await self._call(calls.delete_workflow(workflow_id))

    async def events(
        self,
        workflow_id: str,
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
    ) -> AsyncIterator[Event]:
        """The workflow's events, its current status first, until a terminal status. A
        broken stream is resumed where it broke (``Last-Event-ID``) unless ``reconnect`` is
        off. For a deadline, wrap the loop in ``asyncio.timeout``."""
        resume = Resume(last_event_id)
        while True:
            broke: httpx.TransportError | None = None
            try:
                async for event in self._stream_once(workflow_id, resume):
                    yield event
            except httpx.TransportError as exc:
                broke = exc
            if resume.ended or (broke is None and not reconnect):
                return
            pause = resume.again() if reconnect else None
            if pause is None:
                if broke is not None:
                    raise unreachable(self.server, broke) from broke
                raise ConnectionFailed(
                    f"the event stream of {workflow_id} kept ending before the workflow did"
                )
            await asyncio.sleep(pause)  # backoff before reconnecting

    async def _stream_once(self, workflow_id: str, resume: Resume) -> AsyncIterator[Event]:
        path = calls.subscribe_path(workflow_id)
        timeout = stream_timeout(None)
        async with self._http.stream("GET", path, headers=resume.headers(), timeout=timeout) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise error_for(resp)
            parser = SseParser()
            async for line in resp.aiter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                resume.seen(event)
                yield event
                if resume.ended:
                    return

    async def wait(
        self,
        workflow_id: str,
        *,
        on_event: Callable[[Event], Awaitable[None] | None] | None = None,
    ) -> JSON:
        """Follow the workflow until it ends (``on_event``, plain or async, sees each event);
        the workflow. For a deadline, wrap it in ``asyncio.timeout``."""
        async for event in self.events(workflow_id):
            if on_event is not None:
                told = on_event(event)
                if told is not None:
                    await told
        return await self.get_workflow(workflow_id)

    async def rerun(
        self,
        workflow_id: str,
        *,
        params: Mapping[str, Value] | None = None,
        files: Mapping[str, FileSource] | None = None,
        choices: Mapping[str, str] | None = None,
        timeout_s: int | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        """A new workflow: the original with these parameters changed (the rest kept)."""
        call = calls.rerun(
            workflow_id,
            params=params,
            files=files,
            choices=choices,
            timeout_s=timeout_s,
            correlation_id=correlation_id,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        return cast(JSON, await self._call(call))

    async def rerun_from_node(
        self,
        workflow_id: str,
        node: str | None,
        *,
        params: Mapping[str, Value] | None = None,
        choices: Mapping[str, str] | None = None,
        task_input: Mapping[str, Any] | None = None,
        correlation_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Rerun the same workflow in place from ``node`` (a node id or a task id; ``None``:
        the whole graph) as its next attempt; the workflow's id."""
        call = calls.rerun_from_node(
            workflow_id,
            node,
            params=params,
            choices=choices,
            task_input=task_input,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
        )
        return str(await self._call(call)).strip()

    # --- sweeps ----------------------------------------------------------------------

    async def upload(self, source: FileSource, filename: str | None = None) -> JSON:
        """Store a file once (a path or bytes); its ``sha256`` names it in a sweep's sets."""
        return cast(JSON, await self._call(calls.upload(source, filename)))

    async def sweep(
        self,
        workflow_id: str,
        *,
        grid: Mapping[str, Iterable[Any]] | None = None,
        sets: Iterable[Mapping[str, Any]] | None = None,
        timeout_s: int | None = None,
        correlation_id: str | None = None,
        priority: int | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        """A rerun of ``workflow_id`` for every combination of ``grid`` (``{"$prompt": [...],
        "#sampler": [...]}``) or for each of ``sets``, all made or none; the sweep, its
        workflows in the order of the sets."""
        call = calls.sweep(
            workflow_id,
            grid=grid,
            sets=sets,
            timeout_s=timeout_s,
            correlation_id=correlation_id,
            priority=priority,
            idempotency_key=idempotency_key,
        )
        return cast(JSON, await self._call(call))

    async def get_sweep(self, sweep_id: str) -> JSON:
        """The sweep's workflows in order and how many are in each status."""
        return cast(JSON, await self._call(calls.get_sweep(sweep_id)))

    async def cancel_sweep(self, sweep_id: str) -> JSON:
        """Cancel what of the sweep has not finished; the sweep afterwards."""
        return cast(JSON, await self._call(calls.cancel_sweep(sweep_id)))

    # --- outputs ---------------------------------------------------------------------

    async def outputs(self, workflow_id: str) -> list[JSON]:
        """The current attempt's outputs: id, node_id, filename, kind, content_type, size, src."""
        return cast(list[JSON], (await self._call(calls.list_outputs(workflow_id)))["outputs"])

    async def download(self, output: Mapping[str, Any] | str) -> bytes:
        """An output's bytes (``output``: one of :meth:`outputs`, or its id)."""
        return checked(await self._send(calls.Call("GET", calls.output_path(output)))).content

    async def download_to(self, output: Mapping[str, Any] | str, path: str | os.PathLike[str]) -> Path:
        """Stream an output into the file ``path``; the path."""
        path = Path(path)
        partial = part_path(path)
        try:
            async with self._http.stream("GET", calls.output_path(output)) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise error_for(resp)
                with partial.open("wb") as out:
                    async for chunk in resp.aiter_bytes(1 << 16):
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise unreachable(self.server, exc) from exc
        partial.replace(path)
        return path

    async def save_outputs(self, workflow_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        """Download every output of the workflow into ``directory``; the files written."""
        folder = Path(directory)
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        taken: set[Path] = set()
        return [
            await self.download_to(o, target_path(folder, o, taken)) for o in await self.outputs(workflow_id)
        ]

    # --- the account and its runners ---------------------------------------------------

    async def whoami(self) -> JSON:
        """The token's account, tier, scope and limits."""
        return cast(JSON, await self._call(calls.user()))

    async def list_runners(self, *, page: int = 1, per_page: int = 100) -> JSON:
        """``{"runners": [...], "total": N}``."""
        return cast(JSON, await self._call(calls.list_runners(page=page, per_page=per_page)))

    async def get_runner(self, runner_id: str) -> JSON:
        return cast(JSON, await self._call(calls.get_runner(runner_id)))

    async def create_runner(self, name: str, tags: str | Iterable[str] | None = None) -> JSON:
        """A new runner; its ``token`` (for the agent) is in this answer only."""
        return cast(JSON, await self._call(calls.create_runner(name, tags)))

    async def update_runner(
        self,
        runner_id: str,
        *,
        name: str | None = None,
        tags: Iterable[str] | None = None,
        status: str | None = None,
    ) -> JSON:
        return cast(
            JSON, await self._call(calls.update_runner(runner_id, name=name, tags=tags, status=status))
        )

    async def disable_runner(self, runner_id: str) -> JSON:
        """It finishes what it runs and gets nothing new."""
        return await self.update_runner(runner_id, status="disabled")

    async def enable_runner(self, runner_id: str) -> JSON:
        return await self.update_runner(runner_id, status="active")

    async def delete_runner(self, runner_id: str) -> JSON:
        return cast(JSON, await self._call(calls.delete_runner(runner_id)))
