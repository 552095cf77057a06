"""Server-sent events from an OpenAI-compatible engine, and the rewrites r1nest applies. Pure.

`EventSplitter` cuts a byte stream into events (`data: ...` blocks ended by a blank line).
`rewrite_chunk` takes one parsed chunk, renames `reasoning` to `reasoning_content` (DeepSeek's
name) in `delta` and `message`, reads the usage the engine reported, counts the tokens the chunk
carried, and drops usage the client did not ask for.

Every streamed chat `delta` carries `content` as a string: `""` in a chunk that holds only
reasoning (or a tool call, or nothing). vLLM leaves the key out there, which the SDKs read as
`None`, so the plain `print(chunk.choices[0].delta.content, end="")` loop of the OpenAI examples
printed `None` once per reasoning token. `""` is what vLLM itself sends in the role chunk, and
the OpenAI and DeepSeek SDKs, LangChain and the JavaScript SDK all concatenate it as nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, TypeGuard

DONE = b"[DONE]"
MAX_EVENT_BYTES = 4 * 1024 * 1024  # an engine event larger than this is a broken stream

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


class StreamFormatError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, from the engine's prefix cache


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
    """The `data:` payload of one event; comments and other fields are dropped. An event whose
    data is empty or only whitespace (`data:`, `data: `) carries no chunk: None, like an event
    without data (SSE dispatches no event for empty data; a blank one is nothing to forward)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        payload = event[6:]
    else:
        parts = []
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                parts.append(value[1:] if value.startswith(b" ") else value)
        payload = b"\n".join(parts)
    return payload if payload.strip() else None


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
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(prompt, completion, min(cached, prompt) if _is_count(cached) else 0)


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _choice_tokens(choice: dict[str, Any]) -> int:
    """Tokens a streamed choice carried, for when the engine reports no usage: one per non-empty
    text field (vLLM and SGLang stream one token per delta; a delta that holds both the end of
    the reasoning and the start of the answer came from at least two tokens)."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        reasoning = delta.get("reasoning") or delta.get("reasoning_content")
        return bool(delta.get("content")) + bool(reasoning) + bool(delta.get("tool_calls"))
    return 1 if choice.get("text") else 0


@dataclass(slots=True)
class ChunkInfo:
    payload: bytes | None  # what to forward (None: nothing)
    usage: Usage | None  # usage the engine reported in this chunk
    tokens: int  # generated tokens this chunk carried, counted only when it reports no usage
    is_usage_chunk: bool  # the final `choices: []` chunk that only carries usage
    is_error: bool


# Byte-level fast path. In JSON text an unescaped `"` can only open or close a string, so
# `"reasoning":` (quote, name, quote, colon) can only be an object key: inside a string value
# the quotes would be escaped (`\"reasoning\":`). The fast path renames that key, reads the
# token counts of the usage object (numbers only, no strings, so braces can be matched by
# counting) and cuts it out, without decoding and re-encoding the whole chunk. Anything it does
# not recognise goes the full JSON way; tests hold both paths to the same result.
_REASONING_KEY = b'"reasoning":'
_REASONING_CONTENT_KEY = b'"reasoning_content":'
_CONTENT_KEY = b'"content":'
_DELTA = b'"delta":{'
_REASONING_DELTA = b'"delta":{"reasoning":'
_REASONING_DELTA_OUT = b'"delta":{"content":"","reasoning_content":'
_USAGE_KEY = b',"usage":'
# A count is digits followed by `,` or `}`: `1e30` or `1.5` is no count (the JSON way decides).
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":(\d+)(?=[,}])')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":(\d+)(?=[,}])')
_CACHED_TOKENS = re.compile(rb'"cached_tokens":(\d+)(?=[,}])')
# vLLM's own layout of a usage object (continuous usage stats): read with one anchored match.
_VLLM_USAGE_PREFIX = b',"usage":{"prompt_tokens":'
_VLLM_USAGE = re.compile(rb',"usage":\{"prompt_tokens":(\d+),"total_tokens":\d+,"completion_tokens":(\d+)(?:,"[a-z_]+":null)*\}')
_GENERATED = re.compile(rb'"(?:content|reasoning|reasoning_content|text)":"(?!")|"tool_calls":\[\{')


def _usage_span(payload: bytes) -> tuple[int, int] | None:
    """(start, end) of `,"usage":{...}` or `,"usage":null` at the chunk's top level, or None."""
    start = payload.rfind(_USAGE_KEY)
    if start < 0:
        return None
    value = start + len(_USAGE_KEY)
    if payload.startswith(b"null", value):
        return start, value + 4
    if payload[value : value + 1] != b"{":
        return None
    depth, index = 0, value
    while True:
        open_at, close_at = payload.find(b"{", index), payload.find(b"}", index)
        if close_at < 0:
            return None
        if 0 <= open_at < close_at:
            depth, index = depth + 1, open_at + 1
        else:
            depth, index = depth - 1, close_at + 1
            if depth == 0:
                return start, index


def rename_reasoning_bytes(payload: bytes) -> bytes | None:
    """`reasoning` -> `reasoning_content` keys in JSON text; None when both names are present."""
    if _REASONING_KEY not in payload:
        return payload
    if _REASONING_CONTENT_KEY in payload:
        return None
    return payload.replace(_REASONING_KEY, _REASONING_CONTENT_KEY)


def _rewrite_fast(payload: bytes, keep_usage: bool) -> ChunkInfo | None:
    if payload[:2] != b'{"' or payload[-1:] != b"}" or b'"choices":[' not in payload:
        return None  # error events and anything unusual take the JSON path
    usage: Usage | None = None
    span: tuple[int, int] | None = None
    at = payload.rfind(_VLLM_USAGE_PREFIX)
    found = _VLLM_USAGE.match(payload, at) if at >= 0 else None
    if found is not None:
        span = found.span()
        usage = Usage(int(found.group(1)), int(found.group(2)))
    elif b'"usage"' in payload:
        span = _usage_span(payload)
        if span is None:
            return None
        prompt = _PROMPT_TOKENS.search(payload, span[0], span[1])
        completion = _COMPLETION_TOKENS.search(payload, span[0], span[1])
        if prompt is not None and completion is not None:
            usage = Usage(int(prompt.group(1)), int(completion.group(1)))
            if payload.find(b'"cached_tokens"', span[0], span[1]) >= 0:
                cached = _CACHED_TOKENS.search(payload, span[0], span[1])
                if cached is None:
                    return None  # not a plain count: the JSON way decides
                usage = Usage(usage.prompt_tokens, usage.completion_tokens, min(int(cached.group(1)), usage.prompt_tokens))
        elif payload.find(b'"prompt_tokens"', span[0], span[1]) >= 0:
            return None  # counts that are not plain integers: the JSON way reads them as no usage
    if b'"choices":[]' in payload:
        return ChunkInfo(payload, usage, 0, span is not None, False)
    out = payload if span is None or keep_usage else payload[: span[0]] + payload[span[1] :]
    if _REASONING_KEY in out:
        # a reasoning-only delta gets `"content":""`; anything less plain goes the JSON way
        if _REASONING_CONTENT_KEY in out or _CONTENT_KEY in out:
            return None
        if out.count(_REASONING_DELTA) != out.count(_REASONING_KEY):
            return None
        out = out.replace(_REASONING_DELTA, _REASONING_DELTA_OUT)
    elif _DELTA in out and _CONTENT_KEY not in out:
        return None  # a delta without content (tool call, empty): the JSON way adds it
    return ChunkInfo(out, usage, 0 if usage is not None else len(_GENERATED.findall(out)), False, False)


def carries_text(payload: bytes) -> bool:
    """Whether a forwarded chunk holds generated text (reasoning, content, a tool call)."""
    return _GENERATED.search(payload) is not None


def rewrite_chunk(payload: bytes, *, keep_usage: bool) -> ChunkInfo:
    """Rewrite one engine chunk for the client (fast path, or full JSON when unsure)."""
    fast = _rewrite_fast(payload, keep_usage)
    if fast is not None:
        return fast
    return rewrite_chunk_json(payload, keep_usage=keep_usage)


def rewrite_chunk_json(payload: bytes, *, keep_usage: bool) -> ChunkInfo:
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
        if usage is None:
            tokens += _choice_tokens(choice)
        for field in ("delta", "message"):
            container = choice.get(field)
            if isinstance(container, dict) and rename_reasoning(container):
                changed = True
        delta = choice.get("delta")
        if isinstance(delta, dict) and not isinstance(delta.get("content"), str):
            delta["content"] = ""
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


def usage_chunk(first_chunk: bytes | None, prompt_tokens: int, completion_tokens: int) -> bytes:
    """A final usage chunk for a stream whose engine sent none (the client asked for usage):
    the tokens the gateway charged, under the stream's id and model."""
    try:
        head = json.loads(first_chunk) if first_chunk else {}
    except ValueError:
        head = {}
    if not isinstance(head, dict):
        head = {}
    chunk = {key: head[key] for key in ("id", "object", "created", "model") if key in head}
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    return encode(chunk)
