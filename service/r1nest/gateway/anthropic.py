"""Anthropic's Messages API on top of the metered chat path: requests translated to chat
completions, answers translated back. Pure (the app wires it; gateway/app.py).

    POST /v1/messages               -> the engine's /v1/chat/completions, metered like any chat
    POST /v1/messages/count_tokens  -> the engine's /tokenize (free, like Anthropic's)

Why translate rather than forward to the engine's own /v1/messages (vLLM and SGLang have one):
the chat path is where every money rule lives (the prompt bound and the engine's exact count,
the context fit, the reservation, usage on every chunk for partial-stream billing, aborts on
disconnect). Translating keeps one metered path for both APIs and both engines; forwarding would
need a second parser for Anthropic's events and would trust each engine's own translation.
docs/benchmarks.md has the measured cost of both.

Request: `system` becomes the system message (folded into the first user turn for R1, like any
system prompt); text blocks become text; `tool_use` / `tool_result` blocks become tool calls and
tool messages; `thinking` blocks sent back are dropped (R1's template drops earlier reasoning);
images and documents are refused (R1 is text-only). `max_tokens` is required, as in Anthropic's
API; `stop_sequences`, `temperature`, `top_p`, `top_k`, `tools`, `tool_choice`, `metadata.user_id`
and `thinking.budget_tokens` (the engine's thinking budget) carry over.

Answer: R1's reasoning becomes a `thinking` block (`thinking_delta` events when streamed), the
answer a `text` block, tool calls `tool_use` blocks. `usage.input_tokens` counts the prompt
tokens not read from the prefix cache, `cache_read_input_tokens` those that were, as Anthropic
reports them. A stream's `message_delta` carries the final usage and `remaining_credits`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from r1nest.errors import ApiError, BadRequest
from r1nest.gateway import sse
from r1nest.gateway.proxy import ENDING_MESSAGES, StreamEnd, StreamTracker
from r1nest.gateway.exchange import Exchange

FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "stream", "stop_sequences", "temperature", "top_p", "top_k",
    "tools", "tool_choice", "metadata", "thinking", "service_tier", "container", "mcp_servers",
})
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "abort": "end_turn"}
SSE_ERROR = b"event: error\ndata: "


# requests ----------------------------------------------------------------------------------


def to_chat(body: Any, *, thinking_budget: bool) -> dict[str, Any]:
    """A Messages API request as a chat completions request (400 for what cannot be served).
    `thinking_budget`: the engine takes `thinking_token_budget`."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: must be a non-empty list", param="messages")
    chat: dict[str, Any] = {"max_tokens": max_tokens, "messages": _system(body.get("system"))}
    for index, message in enumerate(messages):
        chat["messages"].extend(_message(message, f"messages.{index}"))
    for name in ("model", "stream", "temperature", "top_p", "top_k"):
        if name in body:
            chat[name] = body[name]
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop_sequences: must be a list of strings", param="stop_sequences")
        chat["stop"] = stop
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    budget = _thinking_budget(body.get("thinking"), max_tokens)
    if budget is not None:
        if not thinking_budget:
            raise BadRequest(
                "thinking.budget_tokens: this deployment's engine has no thinking budget; leave `thinking` out",
                param="thinking",
            )
        chat["thinking_token_budget"] = budget
    return chat


def _text_of(value: Any, where: str) -> str:
    """A string, or a list of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for index, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise BadRequest(f"{where}.{index}: only text blocks are supported here", param=where)
            parts.append(block["text"])
        return "\n".join(parts)
    raise BadRequest(f"{where}: must be a string or a list of text blocks", param=where)


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None:
        return []
    text = _text_of(system, "system")
    return [{"role": "system", "content": text}] if text else []


def _message(message: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise BadRequest(f"{where}: must be an object", param=where)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise BadRequest(f"{where}.role: must be `user` or `assistant`", param=where)
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise BadRequest(f"{where}.content: must be a string or a list of content blocks", param=where)
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    for index, block in enumerate(content):
        at = f"{where}.content.{index}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: R1's template drops it
        elif kind == "tool_use" and role == "assistant":
            tool_calls.append(_tool_call(block, at))
        elif kind == "tool_result" and role == "user":
            tool_results.append(_tool_result(block, at))
        elif kind in ("image", "document", "search_result"):
            raise BadRequest(f"{at}: `{kind}` blocks are not supported; this model reads text only", param=at)
        else:
            raise BadRequest(f"{at}: not a content block this endpoint takes in a `{role}` message", param=at)
    out: list[dict[str, Any]] = list(tool_results)  # answers to the previous turn's tool calls come first
    if role == "assistant":
        assistant: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if tool_calls:
            assistant["tool_calls"] = tool_calls
        out.append(assistant)
    elif texts or not tool_results:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise BadRequest(f"{where}: a tool_use block needs `id`, `name` and an `input` object", param=where)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": sse.encode(arguments).decode()}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise BadRequest(f"{where}.tool_use_id: must be a string", param=where)
    content = block.get("content", "")
    text = _text_of(content, f"{where}.content") if content else ""
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("tools: must be a list", param="tools")
    out = []
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise BadRequest(f"{where}: a tool needs a `name`", param=where)
        if tool.get("type") not in (None, "custom"):
            raise BadRequest(f"{where}: server tools (`{tool.get('type')}`) are not available here", param=where)
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise BadRequest(f"{where}.input_schema: must be an object", param=where)
        function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        return "auto"
    if kind == "any":
        return "required"
    if kind == "none":
        return "none"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("tool_choice: must be {type: auto | any | none | tool, name?}", param="tool_choice")


def _thinking_budget(thinking: Any, max_tokens: Any) -> int | None:
    """`thinking: {type: enabled, budget_tokens: N}` -> N; R1 always thinks, so `disabled` and
    `adaptive` change nothing."""
    if thinking is None:
        return None
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise BadRequest("thinking: must be {type: enabled, budget_tokens} or {type: disabled}", param="thinking")
    if thinking["type"] != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise BadRequest("thinking.budget_tokens: must be a non-negative integer", param="thinking")
    if isinstance(max_tokens, int) and budget >= max_tokens:
        raise BadRequest("thinking.budget_tokens: must be less than max_tokens", param="thinking")
    return budget


# answers -----------------------------------------------------------------------------------


def message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex


def usage_json(usage: sse.Usage | None) -> dict[str, int]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _stop(choice: dict[str, Any], stop_sequences: list[str]) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) for a chat choice's finish_reason (vLLM names the matched
    stop string in `stop_reason`)."""
    finish = choice.get("finish_reason")
    if finish is None:
        return None, None
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn"), None


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {"_unparsed_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def message(answer_body: bytes, *, stop_sequences: list[str], model: str) -> bytes:
    """A whole chat completion (reasoning already named `reasoning_content`) as a Message."""
    answer = json.loads(answer_body)
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    chat_message = choice.get("message")
    if not isinstance(chat_message, dict):
        chat_message = {}
    content: list[dict[str, Any]] = []
    reasoning = chat_message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = chat_message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in chat_message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex,
                        "name": function.get("name", ""), "input": _tool_input(function.get("arguments"))})
    stop_reason, stop_sequence = _stop(choice, stop_sequences)
    return sse.encode({
        "id": message_id(answer.get("id")), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason or "end_turn", "stop_sequence": stop_sequence,
        "usage": usage_json(sse.usage_of(answer)),
    })


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + sse.encode(data) + b"\n\n"


def error_event(exc: ApiError) -> bytes:
    return SSE_ERROR + sse.encode(exc.anthropic_body()) + b"\n\n"


class MessageStream(StreamTracker):
    """A chat completion stream turned into Messages API events as it flows (metering reads
    the engine's chunks exactly as on the chat path: StreamTracker)."""

    __slots__ = ("model", "stop_sequences", "started", "block", "index", "tools", "stop_reason", "stop_sequence", "msg_id")

    def __init__(self, *, model: str, stop_sequences: list[str]) -> None:
        super().__init__(keep_usage=False)
        self.model = model
        self.stop_sequences = stop_sequences
        self.started = False  # message_start sent
        self.block: str | None = None  # the open content block: thinking | text | tool_use
        self.index = -1
        self.tools: dict[int, int] = {}  # the chat tool call's index -> its block's index
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.msg_id = ""

    def emit(self, payload: bytes) -> bytes | None:
        chunk = json.loads(payload)
        out: list[bytes] = []
        if not self.started:
            out.append(self._start(chunk.get("id")))
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict):
                self._choice(choice, out)
        return b"".join(out) or None

    def _start(self, chat_id: Any) -> bytes:
        self.started = True
        self.msg_id = message_id(chat_id)
        usage = usage_json(self.last_usage)
        usage["output_tokens"] = 0
        return event("message_start", {"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage,
        }})

    def _open(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self.block, self.index = kind, self.index + 1
        out.append(event("content_block_start", {"type": "content_block_start", "index": self.index, "content_block": block}))

    def _close(self, out: list[bytes]) -> None:
        if self.block is not None:
            out.append(event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
            self.block = None

    def _delta(self, delta: dict[str, Any], out: list[bytes], index: int | None = None) -> None:
        out.append(event("content_block_delta", {
            "type": "content_block_delta", "index": self.index if index is None else index, "delta": delta,
        }))

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            if self.block != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
            self._delta({"type": "thinking_delta", "thinking": reasoning}, out)
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self.block != "text":
                self._open("text", {"type": "text", "text": ""}, out)
            self._delta({"type": "text_delta", "text": text}, out)
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                self._tool_call(call, out)
        stop_reason, stop_sequence = _stop(choice, self.stop_sequences)
        if stop_reason is not None:
            self.stop_reason, self.stop_sequence = stop_reason, stop_sequence

    def _tool_call(self, call: dict[str, Any], out: list[bytes]) -> None:
        position = call.get("index", 0)
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        if position not in self.tools:
            self._open("tool_use", {
                "type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex,
                "name": function.get("name") or "", "input": {},
            }, out)
            self.tools[position] = self.index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._delta({"type": "input_json_delta", "partial_json": arguments}, out, self.tools[position])

    def tail(self, end: StreamEnd, *, balance: int) -> bytes:
        """The end of the stream: the open block closed, the final usage and stop reason with
        the balance after settlement, message_stop; or an error event when it was cut short."""
        out: list[bytes] = []
        if not self.started:
            out.append(self._start(None))
        if end.ending != "complete":
            out.append(error_event(ApiError(ENDING_MESSAGES[end.ending])))
            return b"".join(out)
        self._close(out)
        usage = usage_json(self.usage())
        out.append(event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason or "end_turn", "stop_sequence": self.stop_sequence},
            "usage": usage, "remaining_credits": balance,
        }))
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


async def finish_stream(exchange: Exchange, end: StreamEnd, *, balance: int) -> None:
    tracker = end.tracker
    assert isinstance(tracker, MessageStream)
    await exchange.body(tracker.tail(end, balance=balance))


def error_tail(exc: ApiError) -> bytes:
    """How a Messages stream that already started ends on a fault."""
    return error_event(exc)
