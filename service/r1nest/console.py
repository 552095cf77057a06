"""What `r1nest serve` prints: engine log lines, warming progress, and the banner once ready.

Everything goes to stderr except the banner (stdout): the endpoint, the key, and a curl command
that works as printed. On a terminal the warming progress is a bar; elsewhere a plain line every
PLAIN_PROGRESS_EVERY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import time
from pathlib import Path
from typing import Any

from r1nest.files import ADMIN_KEY_FILE, API_KEY_FILE
from r1nest.gateway.state import EngineState
from r1nest.launch import Launch

PLAIN_PROGRESS_EVERY_S = 15.0
PROGRESS_REFRESH_S = 0.5


def client_base_url(settings: Any) -> str:
    """The gateway's base URL as a client on this box reaches it (never the wildcard address)."""
    if settings.public_url:
        return str(settings.public_url).rstrip("/")
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def curl_command(base_url: str, served_model: str, key_ref: str) -> str:
    """A chat request that works as printed. `key_ref` is the key or a shell expression for it."""
    body = json.dumps({"model": served_model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 64}, separators=(",", ":"))
    return (f"curl {base_url}/v1/chat/completions -H \"Authorization: Bearer {key_ref}\" "
            f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")


def banner_lines(*, launch: Launch, base_url: str, key: str, key_created: bool, data_dir: Path,
                 startup_s: float | None) -> list[str]:
    """The ready banner: the endpoint, the overview, the key (whole only when just created)."""
    from r1nest.keys import mask

    key_file = data_dir / API_KEY_FILE
    key_ref = f"$(cat {shlex.quote(str(key_file))})"
    lines = [
        "",
        f"r1nest is serving {launch.served_model} ({launch.engine}, {launch.hardware})"
        + (f", ready in {startup_s:.0f} s" if startup_s else ""),
        f"  endpoint   {base_url}/v1   (OpenAI-compatible; reasoning in reasoning_content)",
        f"  overview   {base_url}/overview   (log in with the admin key in {data_dir / ADMIN_KEY_FILE})",
    ]
    if key_created:
        lines.append(f"  API key    {key}   (shown once; also kept in {key_file})")
    else:
        lines.append(f"  API key    {mask(key)}   (in {key_file})")
    lines += ["", "Try it:", "  " + curl_command(base_url, launch.served_model, key_ref), ""]
    return lines


class Display:
    """The console of `r1nest serve` (rich on stderr and stdout)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)

    def engine_line(self, line: str) -> None:
        from rich.text import Text

        self.err.print(Text("engine | ", style="dim") + Text(line), soft_wrap=True)

    def note(self, message: str) -> None:
        self.err.print(message, markup=False, soft_wrap=True)

    async def warming(self, state: EngineState, eta_s: float, ready: asyncio.Event) -> None:
        """Show progress until `ready` is set (or the task is cancelled)."""
        if self.err.is_terminal:
            await self._progress_bar(state, eta_s, ready)
        else:
            await self._progress_lines(state, ready)

    async def _progress_bar(self, state: EngineState, eta_s: float, ready: asyncio.Event) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        started = time.monotonic()
        total = max(eta_s, 1.0)
        progress = Progress(SpinnerColumn(), TextColumn("[bold]engine {task.fields[phase]}"), BarColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.err,
                            transient=True)
        with progress:
            task = progress.add_task("engine", total=total, phase="warming", eta="")
            while not ready.is_set():
                left = state.eta_remaining_s()
                progress.update(task, completed=min(time.monotonic() - started, total * 0.99), phase=state.phase,
                                eta=f"~{left:.0f} s left" if left else "")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(ready.wait(), PROGRESS_REFRESH_S)

    async def _progress_lines(self, state: EngineState, ready: asyncio.Event) -> None:
        started = time.monotonic()
        while not ready.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ready.wait(), PLAIN_PROGRESS_EVERY_S)
            if not ready.is_set():
                left = state.eta_remaining_s()
                self.note(f"engine {state.phase}: {time.monotonic() - started:.0f} s elapsed"
                          + (f", ~{left:.0f} s left" if left else ""))

    def banner(self, *, launch: Launch, base_url: str, key: str, key_created: bool, data_dir: Path,
               startup_s: float | None) -> None:
        """The ready banner (banner_lines) on stdout."""
        lines = banner_lines(launch=launch, base_url=base_url, key=key, key_created=key_created,
                             data_dir=data_dir, startup_s=startup_s)
        self.out.print("\n".join(lines), markup=False, soft_wrap=True)
