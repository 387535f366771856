"""A child process in a process group of its own, with its output turned into lines.

Two things asyncio's ``create_subprocess_exec`` does not give: signals to the whole group (a
wrapper script and everything it started), and noticing the process's end when the process
ends. ``Process.wait()`` also waits for its output pipe to close, which never happens while
something the process started lives on holding the pipe: exactly the case a supervisor has
to clean up after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping

OnLine = Callable[[str], None]

# A line of output longer than this is passed on in pieces.
_MAX_LINE_BYTES = 8192
# After the process ended, its output gets this long to be read to the end.
_DRAIN_S = 1.0


class _ExitAwareProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class GroupProcess:
    """``await GroupProcess.spawn(argv, on_line=...)``; then :meth:`wait`, :meth:`terminate`
    and, always, :meth:`close`."""

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: _ExitAwareProtocol,
        stdout: asyncio.StreamReader,
        on_line: OnLine,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self.pid: int = transport.get_pid()
        self._pump = asyncio.create_task(self._read_lines(stdout, on_line))

    @classmethod
    async def spawn(
        cls, argv: list[str], *, on_line: OnLine, env: Mapping[str, str] | None = None
    ) -> GroupProcess:
        """Start ``argv`` (no shell) with stdout and stderr going to ``on_line``. Raises
        :class:`OSError` when it cannot be started."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitAwareProtocol(loop),
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group (and session): signals reach whatever the command starts,
            # and a terminal's Ctrl+C meant for the agent does not reach it.
            start_new_session=True,
            env=dict(env) if env is not None else None,
        )
        stdout = protocol.stdout
        assert stdout is not None
        return cls(transport, protocol, stdout, on_line)

    @property
    def returncode(self) -> int | None:
        """``None`` while it runs; negative: the signal that ended it."""
        return self._transport.get_returncode()

    @property
    def exited(self) -> bool:
        return self._protocol.exited.is_set()

    async def wait(self) -> int:
        await self._protocol.exited.wait()
        code = self.returncode
        assert code is not None
        return code

    def signal_group(self, signum: signal.Signals) -> None:
        # Gone already (ProcessLookupError) is what was wanted.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def terminate(self, grace_s: float) -> bool:
        """SIGTERM to the group, SIGKILL after ``grace_s``; ``True`` if SIGTERM was enough.
        Whatever of the group outlives the process is killed too."""
        self.signal_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace_s)
            obeyed = True
        except TimeoutError:
            self.signal_group(signal.SIGKILL)
            await self.wait()
            obeyed = False
        self.signal_group(signal.SIGKILL)
        return obeyed

    async def close(self) -> None:
        """Kill what is left of the group and stop reading its output (after a short drain,
        so that its last words are not lost)."""
        if not self.exited:
            self.signal_group(signal.SIGKILL)
            await self.wait()
        else:
            self.signal_group(signal.SIGKILL)
        await asyncio.wait({self._pump}, timeout=_DRAIN_S)
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)
        self._transport.close()

    @staticmethod
    async def _read_lines(stream: asyncio.StreamReader, on_line: OnLine) -> None:
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            # Progress bars redraw with \r: each redraw is a line of its own.
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            if len(pending) > _MAX_LINE_BYTES:
                lines.append(pending)
                pending = b""
            for line in lines:
                _emit(line, on_line)
        _emit(pending, on_line)


def _emit(line: bytes, on_line: OnLine) -> None:
    text = line.decode(errors="replace").rstrip()
    if text.strip():
        on_line(text)
