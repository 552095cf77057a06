"""Server-sent events from an OpenAI-compatible engine, and the rewrites r1nest applies. Pure.

`EventSplitter` cuts a byte stream into events (`data: ...` blocks ended by a blank line).
`rewrite_chunk` takes one parsed chunk, renames `reasoning` to `reasoning_content` (DeepSeek's
name) in `delta` and `message`, reads the usage the engine reported, counts the tokens the chunk
carried, and drops usage the client did not ask for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

DONE = b"[DONE]"
MAX_EVENT_BYTES = 4 * 1024 * 1024  # an engine event larger than this is a broken stream

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class StreamFormatError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class EventSplitter:
    """Feed bytes, get back the `data` payloads of complete events (bounded buffer)."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        events = buffer.split(b"\n\n")
        self._buffer = events.pop()
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise StreamFormatError("event too large")
        payloads = []
        for event in events:
            payload = _data_of(event)
            if payload is not None:
                payloads.append(payload)
        return payloads

    @property
    def pending(self) -> bytes:
        return self._buffer


def _data_of(event: bytes) -> bytes | None:
    """The `data:` payload of one event; comments and other fields are dropped."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


DONE_EVENT = event(DONE)


def encode(obj: Any) -> bytes:
    return _encode(obj).encode("utf-8")


def rename_reasoning(container: dict[str, Any]) -> bool:
    """`reasoning` -> `reasoning_content` in a message or delta, keeping key order. True if changed."""
    if "reasoning" not in container:
        return False
    value = container["reasoning"]
    items = list(container.items())
    container.clear()
    have_content = any(k == "reasoning_content" and v is not None for k, v in items)
    for key, item in items:
        if key == "reasoning":
            if not have_content:
                container["reasoning_content"] = value
        elif key == "reasoning_content" and not have_content:
            continue  # a None placeholder replaced by the value above
        else:
            container[key] = item
    return True


def usage_of(chunk: dict[str, Any]) -> Usage | None:
    usage = chunk.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not _is_count(prompt) or not _is_count(completion):
        return None
    return Usage(prompt, completion)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _choice_tokens(choice: dict[str, Any]) -> int:
    """1 if this streamed choice carried generated text (one delta is one token in vLLM/SGLang)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for field in ("content", "reasoning", "reasoning_content"):
            if delta.get(field):
                return 1
        return 1 if delta.get("tool_calls") else 0
    return 1 if choice.get("text") else 0


@dataclass(slots=True)
class ChunkInfo:
    payload: bytes | None  # what to forward (None: nothing)
    usage: Usage | None  # usage the engine reported in this chunk
    tokens: int  # generated tokens this chunk carried (fallback when usage is missing)
    is_usage_chunk: bool  # the final `choices: []` chunk that only carries usage
    is_error: bool


def rewrite_chunk(payload: bytes, *, keep_usage: bool) -> ChunkInfo:
    """Rewrite one engine chunk for the client.

    keep_usage: forward per-chunk usage (the client asked for continuous usage stats).
    The final usage-only chunk is returned with `is_usage_chunk` and its payload untouched:
    the caller decides whether and how the client sees it.
    """
    try:
        chunk = json.loads(payload)
    except ValueError as exc:
        raise StreamFormatError("engine sent a chunk that is not JSON") from exc
    if not isinstance(chunk, dict):
        raise StreamFormatError("engine sent a chunk that is not a JSON object")
    if "error" in chunk and "choices" not in chunk:
        return ChunkInfo(None, None, 0, False, True)
    usage = usage_of(chunk)
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise StreamFormatError("engine chunk without choices")
    if not choices and "usage" in chunk:
        return ChunkInfo(payload, usage, 0, True, False)
    changed = False
    tokens = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        tokens += _choice_tokens(choice)
        for field in ("delta", "message"):
            container = choice.get(field)
            if isinstance(container, dict) and rename_reasoning(container):
                changed = True
    if "usage" in chunk and not keep_usage:
        del chunk["usage"]
        changed = True
    return ChunkInfo(encode(chunk) if changed else payload, usage, tokens, False, False)


def with_remaining_credits(usage_payload: bytes, remaining_credits: int) -> bytes:
    """The final usage chunk with the key's balance after settlement added at its top level."""
    chunk = json.loads(usage_payload)
    chunk["remaining_credits"] = remaining_credits
    return encode(chunk)
