"""The blocking client, on one ``httpx.Client`` (its connections kept between calls)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
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
    remaining,
    request_args,
    stream_timeout,
    unreachable,
)


class Client:
    """``Client("http://127.0.0.1:8080", token)``; use it as a context manager, or close it."""

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = normalise_server(server)
        self._http = httpx.Client(
            base_url=self.server, headers=base_headers(token), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.request(call.method, call.path, **request_args(call))
        except httpx.TransportError as exc:
            raise unreachable(self.server, exc) from exc

    def _call(self, call: Call) -> Any:
        return decoded(self._send(call))

    # --- workflows -------------------------------------------------------------------

    def submit(
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
        return cast(JSON, self._call(call))

    def get_workflow(self, workflow_id: str) -> JSON:
        """The workflow with its current tasks, queue position and reruns."""
        return cast(JSON, self._call(calls.get_workflow(workflow_id)))

    def list_workflows(
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
        return cast(JSON, self._call(call))

    def tasks(self, workflow_id: str, attempt: int | None = None) -> JSON:
        return cast(JSON, self._call(calls.tasks(workflow_id, attempt)))

    def cancel(self, workflow_id: str) -> JSON:
        return cast(JSON, self._call(calls.cancel(workflow_id)))

    def delete_workflow(self, workflow_id: str) -> None:
        """Delete a finished workflow with its outputs (a ``Conflict`` until it has finished)."""
        self._call(calls.delete_workflow(workflow_id))

    def events(
        self,
        workflow_id: str,
        *,
        last_event_id: str | None = None,
        reconnect: bool = True,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """The workflow's events, its current status first, until a terminal status. A
        broken stream is resumed where it broke (``Last-Event-ID``) unless ``reconnect`` is
        off; :class:`WaitTimeout` once ``timeout`` seconds have passed."""
        resume = Resume(last_event_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            broke: httpx.TransportError | None = None
            try:
                yield from self._stream_once(workflow_id, resume, deadline)
            except httpx.TransportError as exc:
                broke = exc
            if resume.ended or (broke is None and not reconnect):
                return
            remaining(deadline)
            pause = resume.again() if reconnect else None
            if pause is None:
                if broke is not None:
                    raise unreachable(self.server, broke) from broke
                raise ConnectionFailed(
                    f"the event stream of {workflow_id} kept ending before the workflow did"
                )
            time.sleep(pause)  # backoff before reconnecting

    def _stream_once(self, workflow_id: str, resume: Resume, deadline: float | None) -> Iterator[Event]:
        path = calls.subscribe_path(workflow_id)
        with self._http.stream(
            "GET", path, headers=resume.headers(), timeout=stream_timeout(deadline)
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise error_for(resp)
            parser = SseParser()
            for line in resp.iter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                resume.seen(event)
                yield event
                if resume.ended:
                    return
                remaining(deadline)

    def wait(
        self,
        workflow_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> JSON:
        """Follow the workflow until it ends (``on_event`` sees each event); the workflow."""
        for event in self.events(workflow_id, timeout=timeout):
            if on_event is not None:
                on_event(event)
        return self.get_workflow(workflow_id)

    def rerun(
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
        return cast(JSON, self._call(call))

    def rerun_from_node(
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
        return str(self._call(call)).strip()

    # --- sweeps ----------------------------------------------------------------------

    def upload(self, source: FileSource, filename: str | None = None) -> JSON:
        """Store a file once (a path or bytes); its ``sha256`` names it in a sweep's sets."""
        return cast(JSON, self._call(calls.upload(source, filename)))

    def sweep(
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
        return cast(JSON, self._call(call))

    def get_sweep(self, sweep_id: str) -> JSON:
        """The sweep's workflows in order and how many are in each status."""
        return cast(JSON, self._call(calls.get_sweep(sweep_id)))

    def cancel_sweep(self, sweep_id: str) -> JSON:
        """Cancel what of the sweep has not finished; the sweep afterwards."""
        return cast(JSON, self._call(calls.cancel_sweep(sweep_id)))

    # --- outputs ---------------------------------------------------------------------

    def outputs(self, workflow_id: str) -> list[JSON]:
        """The current attempt's outputs: id, node_id, filename, kind, content_type, size, src."""
        return cast(list[JSON], self._call(calls.list_outputs(workflow_id))["outputs"])

    def download(self, output: Mapping[str, Any] | str) -> bytes:
        """An output's bytes (``output``: one of :meth:`outputs`, or its id)."""
        return checked(self._send(calls.Call("GET", calls.output_path(output)))).content

    def download_to(self, output: Mapping[str, Any] | str, path: str | os.PathLike[str]) -> Path:
        """Stream an output into the file ``path``; the path."""
        path = Path(path)
        partial = part_path(path)
        try:
            with self._http.stream("GET", calls.output_path(output)) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_for(resp)
                with partial.open("wb") as out:
                    for chunk in resp.iter_bytes(1 << 16):
                        out.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise unreachable(self.server, exc) from exc
        partial.replace(path)
        return path

    def save_outputs(self, workflow_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        """Download every output of the workflow into ``directory``; the files written."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        taken: set[Path] = set()
        return [self.download_to(o, target_path(folder, o, taken)) for o in self.outputs(workflow_id)]

    # --- the account and its runners ---------------------------------------------------

    def whoami(self) -> JSON:
        """The token's account, tier, scope and limits."""
        return cast(JSON, self._call(calls.user()))

    def list_runners(self, *, page: int = 1, per_page: int = 100) -> JSON:
        """``{"runners": [...], "total": N}``."""
        return cast(JSON, self._call(calls.list_runners(page=page, per_page=per_page)))

    def get_runner(self, runner_id: str) -> JSON:
        return cast(JSON, self._call(calls.get_runner(runner_id)))

    def create_runner(self, name: str, tags: str | Iterable[str] | None = None) -> JSON:
        """A new runner; its ``token`` (for the agent) is in this answer only."""
        return cast(JSON, self._call(calls.create_runner(name, tags)))

    def update_runner(
        self,
        runner_id: str,
        *,
        name: str | None = None,
        tags: Iterable[str] | None = None,
        status: str | None = None,
    ) -> JSON:
        return cast(JSON, self._call(calls.update_runner(runner_id, name=name, tags=tags, status=status)))

    def disable_runner(self, runner_id: str) -> JSON:
        """It finishes what it runs and gets nothing new."""
        return self.update_runner(runner_id, status="disabled")

    def enable_runner(self, runner_id: str) -> JSON:
        return self.update_runner(runner_id, status="active")

    def delete_runner(self, runner_id: str) -> JSON:
        return cast(JSON, self._call(calls.delete_runner(runner_id)))
