"""What the gateway checks and changes in a completion request before it reaches the engine. Pure.

- validation with clear 400/404 answers (shape, `messages` count, `max_tokens` cap, model name);
- DeepSeek-R1 conventions: temperature 0.6 / top_p 0.95 when absent, the system prompt folded
  into the first user turn;
- usage forced on streams (`stream_options.include_usage` + `continuous_usage_stats`, which vLLM
  and SGLang both honour), so that partial streams can be paid exactly;
- a safe upper bound on prompt tokens, for the reservation.

Prompt upper bound: the engines serve byte-level BPE tokenizers (DeepSeek, Qwen, Llama 3), where
every token stands for at least one byte of text, so a text of B UTF-8 bytes is at most B tokens.
The bound is the UTF-8 byte length of the messages' text fields, the JSON length (ASCII-escaped,
as a template's `tojson` writes it at most) of their structured fields (tool calls) and of
`tools`, plus PER_MESSAGE_OVERHEAD_TOKENS per message, TEMPLATE_OVERHEAD_TOKENS for the chat
template's special tokens and generation prompt, and the tool preamble. Token-id prompts count
one per id. When the engine can count the prompt itself (vLLM's /tokenize), its count replaces
the bound (`fit_context`); requests with `tools` are always counted that way.
Non-text content parts (images, audio) are refused: the bound would not hold for them, and the
R1 family is text-only.

The context (`fit_context`): a request must fit the engine's context, prompt + `max_tokens` per
sequence. The gateway asks the engine for the exact prompt length (vLLM's /tokenize renders the
same template) when the byte bound cannot settle the question: `max_tokens` absent, prompt bound
+ `max_tokens` over the context, or fields that change the rendered template (`tools`...). Then:
- the prompt alone fills the context: 400 `context_length_exceeded`;
- an explicit `max_tokens` over what the context leaves: 400 `context_length_exceeded`, the message
  naming the largest value that fits (as OpenAI's and DeepSeek's APIs answer);
- `max_tokens` absent: the context left (at most `max_tokens_cap`), lowered to what the balance
  affords by metering.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from r1nest.errors import BadRequest, ContextLengthExceeded, NotFound
from r1nest.gateway.sse import encode

TEMPLATE_OVERHEAD_TOKENS = 64
PER_MESSAGE_OVERHEAD_TOKENS = 16
TOOLS_HEADER_TOKENS = 512  # R1's tool template: about 350 bytes of preamble
PER_TOOL_OVERHEAD_TOKENS = 32  # the fence around each tool's JSON
MAX_CHOICES = 16
MAX_PROMPTS = 64
MAX_JSON_DEPTH = 64  # objects and arrays nested deeper than this are refused (400)

# The body sent upstream is rebuilt from these fields only: the OpenAI and DeepSeek request
# fields, vLLM's and SGLang's sampling and structured-output extensions. Fields a deployment
# decides (ENGINE_CONTROL_FIELDS) are refused with 400; anything else is dropped.
COMMON_FIELDS = frozenset({
    "model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty", "stop",
    "stop_token_ids", "seed", "logprobs", "logit_bias", "user", "min_tokens", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_whitespace_pattern", "best_of", "use_beam_search",
})
CHAT_FIELDS = COMMON_FIELDS | frozenset({
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "thinking_token_budget",
})
COMPLETION_FIELDS = COMMON_FIELDS | frozenset({"prompt", "echo", "suffix"})
ENGINE_CONTROL_FIELDS = frozenset({
    "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "documents", "priority", "request_id", "mm_processor_kwargs", "cache_salt",
    "kv_transfer_params", "vllm_xargs", "logits_processors", "media_io_kwargs", "return_token_ids",
    "return_tokens_as_token_ids", "prompt_embeds", "bad_words", "allowed_token_ids",
    "truncate_prompt_tokens", "prompt_logprobs", "lora_request", "rid", "custom_logit_processor",
})

# Chat fields besides the messages that change the rendered prompt and reach the engine (the
# others, such as chat_template_kwargs, are ENGINE_CONTROL_FIELDS): sent to /tokenize as well.
TEMPLATE_FIELDS = ("tools",)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True, slots=True)
class Policy:
    served_model: str
    max_messages: int
    max_tokens_cap: int
    deepseek_defaults: bool = True
    fold_system_prompt: bool = True
    default_temperature: float = 0.6
    default_top_p: float = 0.95


@dataclass(slots=True)
class Shaped:
    body: dict[str, Any]  # what goes upstream, once max_tokens is set
    stream: bool
    prompt_tokens_bound: int
    choices: int  # sequences generated: n x number of prompts
    requested_max_tokens: int | None
    client_usage: bool  # the client asked for the final usage chunk
    client_continuous_usage: bool  # ... and for usage on every chunk
    longest_prompt_bound: int = 0  # bound of the longest single prompt (chat: the conversation)
    completion_room: int | None = None  # tokens the context leaves each sequence, once known
    prompt_exact: bool = False  # prompt_tokens_bound is the engine's own count
    max_tokens_is_ceiling: bool = False  # lowered to what the deployment allows, never refused for it

    @property
    def chat(self) -> bool:
        return "messages" in self.body

    def needs_exact_prompt(self, context_tokens: int) -> bool:
        """Whether the byte bound cannot settle the context question (or may not hold)."""
        requested = self.requested_max_tokens
        if requested is None or self.longest_prompt_bound + requested > context_tokens:
            return True
        return self.chat and any(name in self.body for name in TEMPLATE_FIELDS)

    def max_tokens_limit(self, cap: int) -> int:
        """The `max_tokens` to ask for before the balance is considered."""
        if self.requested_max_tokens is not None:
            return self.requested_max_tokens
        return cap if self.completion_room is None else min(cap, self.completion_room)


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"The request body holds `{name}`, which is not standard JSON.")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_body(raw: bytes) -> Any:
    """The request body as JSON, or 400: invalid UTF-8 or JSON, NaN / Infinity, strings with
    lone surrogates (they cannot be sent on as UTF-8), objects nested over MAX_JSON_DEPTH."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except RecursionError:
        raise BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError:  # includes invalid UTF-8 (UnicodeDecodeError)
        raise BadRequest("The request body is not valid JSON.") from None
    # Cheap screens first: deep nesting needs that many brackets, a lone surrogate an escape.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH or b"\\u" in raw:
        _check_json_value(body)
    return body


def _check_json_value(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("The request body holds a string that is not valid Unicode (a lone surrogate).") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _allowed(body: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    """The body rebuilt from the allowlist; engine-control fields are refused."""
    refused = sorted(name for name in body if name in ENGINE_CONTROL_FIELDS)
    if refused:
        raise BadRequest(f"`{refused[0]}` is set by the deployment, not by requests.", param=refused[0])
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    return {name: value for name, value in body.items() if name in allowed}


def shape(body: Any, *, chat: bool, policy: Policy, max_tokens_is_ceiling: bool = False) -> Shaped:
    """Validate a request body and apply the deployment's conventions (max_tokens left unset).

    `max_tokens_is_ceiling`: the API makes `max_tokens` required (Anthropic's Messages API), so
    clients send a large one without knowing the deployment: it is lowered to the deployment's
    cap and, in `fit_context`, to what the context leaves, instead of being refused."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    body = _allowed(body, chat=chat)
    model = body.get("model")
    if model is not None and model != policy.served_model:
        if not isinstance(model, str):
            raise BadRequest("`model` must be a string", param="model")
        raise NotFound(
            f"The model `{model}` does not exist. This deployment serves `{policy.served_model}`.",
            code="model_not_found",
            param="model",
        )
    body["model"] = policy.served_model

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be true or false", param="stream")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"`n` must be an integer from 1 to {MAX_CHOICES}", param="n")
    if body.get("best_of") not in (None, 1) or body.get("use_beam_search"):
        raise BadRequest("`best_of` and beam search are not supported", param="best_of")

    if chat:
        messages = _without_reasoning(_check_messages(body.get("messages"), policy))
        if policy.fold_system_prompt:
            messages = fold_system_prompt(messages)
        body["messages"] = messages
        bound = chat_prompt_bound(messages, body.get("tools"))
        prompts, longest = 1, bound
    else:
        bound, prompts, longest = completion_prompt_bound(body.get("prompt"))

    requested = _requested_max_tokens(body, policy, ceiling=max_tokens_is_ceiling)
    if policy.deepseek_defaults:
        if body.get("temperature") is None:
            body["temperature"] = policy.default_temperature
        if body.get("top_p") is None:
            body["top_p"] = policy.default_top_p

    client_usage = client_continuous = False
    if stream:
        options = body.get("stream_options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise BadRequest("`stream_options` must be an object", param="stream_options")
        client_usage = bool(options.get("include_usage"))
        client_continuous = client_usage and bool(options.get("continuous_usage_stats"))
        body["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": True}
    else:
        body.pop("stream_options", None)
    return Shaped(body, stream, bound, n * prompts, requested, client_usage, client_continuous, longest,
                  max_tokens_is_ceiling=max_tokens_is_ceiling)


def fit_context(shaped: Shaped, context_tokens: int, exact_prompt_tokens: int | None) -> None:
    """Check the request against the engine's context and set `completion_room`.

    `exact_prompt_tokens`: the engine's own count of the (single) prompt, or None (byte bound).
    ContextLengthExceeded when the prompt, or prompt + an explicit `max_tokens`, cannot fit.
    """
    what = "messages" if shaped.chat else "prompt"
    requested = shaped.requested_max_tokens
    if exact_prompt_tokens is not None:
        shaped.prompt_tokens_bound = shaped.longest_prompt_bound = exact_prompt_tokens
        shaped.prompt_exact = True
        room = context_tokens - exact_prompt_tokens
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_tokens} tokens. However, your "
                f"{what} resulted in {exact_prompt_tokens} tokens, which leaves no room for an answer. "
                f"Please reduce the length of the {what}.",
                param=what,
            )
        if requested is not None and requested > room and shaped.max_tokens_is_ceiling:
            shaped.requested_max_tokens = requested = room
        if requested is not None and requested > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_tokens} tokens. However, you requested "
                f"{exact_prompt_tokens + requested} tokens ({exact_prompt_tokens} in the {what}, {requested} "
                f"in the completion). Please reduce the length of the {what} or completion "
                f"(max_tokens can be at most {room} for these {what}).",
                param="max_tokens",
            )
        shaped.completion_room = room
        return
    # The byte bound only: an upper bound on the prompt, so only certainties are refused.
    room = context_tokens - shaped.longest_prompt_bound
    if requested is not None and requested >= context_tokens and shaped.max_tokens_is_ceiling:
        shaped.requested_max_tokens = requested = room if room >= 1 else context_tokens - 1
    if requested is not None and requested >= context_tokens:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_tokens} tokens. However, you requested "
            f"{requested} tokens in the completion alone. Please reduce max_tokens.",
            param="max_tokens",
        )
    room = context_tokens - shaped.longest_prompt_bound
    shaped.completion_room = room if room >= 1 else context_tokens - 1


def upstream_body(shaped: Shaped, max_tokens: int) -> bytes:
    """The body sent to the engine: the shaped request with the granted `max_tokens`, as
    standard JSON."""
    body = dict(shaped.body)
    body.pop("max_completion_tokens", None)
    body["max_tokens"] = max_tokens
    min_tokens = body.get("min_tokens")
    if _is_int(min_tokens) and min_tokens > max_tokens:
        body["min_tokens"] = max_tokens
    return encode(body)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _requested_max_tokens(body: dict[str, Any], policy: Policy, *, ceiling: bool = False) -> int | None:
    value = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if value is None:
        value, name = body.get("max_tokens"), "max_tokens"
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise BadRequest(f"`{name}` must be a positive integer", param=name)
    if value > policy.max_tokens_cap and ceiling:
        return policy.max_tokens_cap
    if value > policy.max_tokens_cap:
        raise BadRequest(
            f"`{name}` must be at most {policy.max_tokens_cap} on this deployment", param=name
        )
    return value


def _check_messages(messages: Any, policy: Policy) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list", param="messages")
    if len(messages) > policy.max_messages:
        raise BadRequest(
            f"too many messages: {len(messages)}, at most {policy.max_messages}", param="messages"
        )
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadRequest(f"`{where}` must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequest(f"`{where}.role` must be one of {', '.join(sorted(ROLES))}", param=where)
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"`{where}.content` may only hold text parts", param=where)
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"`{where}.content` must be a string or a list of text parts", param=where)
    return messages


def _without_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Earlier answers sent back with their reasoning (`reasoning_content`, as DeepSeek's API
    returns it): the reasoning is dropped, as R1's chat template drops it, so it is neither
    rendered nor counted in the prompt bound."""
    if not any("reasoning_content" in m or "reasoning" in m for m in messages):
        return messages
    return [{k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")}
            if m.get("role") == "assistant" else m for m in messages]


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part["text"] for part in content)
    return content or ""


def fold_system_prompt(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeepSeek-R1 takes no system prompt: system (and developer) text is put in front of the
    first user turn; with no user turn, it becomes one."""
    system = [m for m in messages if m.get("role") in ("system", "developer")]
    if not system:
        return messages
    instructions = "\n\n".join(t for t in (_text(m.get("content")) for m in system) if t)
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    for index, message in enumerate(rest):
        if message.get("role") == "user":
            user_text = _text(message.get("content"))
            folded = f"{instructions}\n\n{user_text}" if instructions and user_text else instructions or user_text
            rest[index] = {**message, "content": folded}
            return rest
    return [{"role": "user", "content": instructions}, *rest]


def _json_bytes(value: Any) -> int:
    """An upper bound on the bytes of `value` rendered with a template's `tojson`: ASCII-escaped
    JSON with spaced separators (transformers' tojson, or Jinja's, which also writes <, >, &
    and ' as 6-byte escapes)."""
    text = json.dumps(value, ensure_ascii=True)
    return len(text) + 5 * sum(text.count(c) for c in "<>&'")


def _message_bytes(message: dict[str, Any]) -> int:
    """Text fields as their UTF-8 bytes (templates insert them as they are); structured fields
    (tool calls, content parts) as their JSON, which is how templates render them."""
    total = 0
    for key, value in message.items():
        total += len(key)
        total += len(value.encode("utf-8")) if isinstance(value, str) else _json_bytes(value)
    return total


def chat_prompt_bound(messages: list[dict[str, Any]], tools: Any = None) -> int:
    """Messages' bytes + PER_MESSAGE_OVERHEAD_TOKENS each + TEMPLATE_OVERHEAD_TOKENS; `tools`
    as their JSON with TOOLS_HEADER_TOKENS and PER_TOOL_OVERHEAD_TOKENS each (R1's tool template
    writes a fixed preamble and each tool's `tojson` in a fenced block)."""
    per_message = sum(_message_bytes(m) + PER_MESSAGE_OVERHEAD_TOKENS for m in messages)
    bound = TEMPLATE_OVERHEAD_TOKENS + per_message
    if tools:
        count = len(tools) if isinstance(tools, list) else 1
        bound += TOOLS_HEADER_TOKENS + PER_TOOL_OVERHEAD_TOKENS * count + _json_bytes(tools)
    return bound


def completion_prompt_bound(prompt: Any) -> tuple[int, int, int]:
    """(token upper bound over all prompts, number of prompts, bound of the longest prompt)."""
    if isinstance(prompt, str):
        bound = len(prompt.encode("utf-8")) + TEMPLATE_OVERHEAD_TOKENS
        return bound, 1, bound
    if isinstance(prompt, list) and prompt:
        bounds: list[int] | None = None
        if all(_is_int(t) for t in prompt):
            bounds = [len(prompt) + TEMPLATE_OVERHEAD_TOKENS]
        elif all(isinstance(p, str) for p in prompt):
            bounds = [len(p.encode("utf-8")) + TEMPLATE_OVERHEAD_TOKENS for p in prompt]
        elif all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            bounds = [len(p) + TEMPLATE_OVERHEAD_TOKENS for p in prompt]
        if bounds is not None:
            if len(bounds) > 1:
                _check_prompt_count(len(bounds))
            return sum(bounds), len(bounds), max(bounds)
    raise BadRequest("`prompt` must be a string, a list of strings, or token ids", param="prompt")


def _check_prompt_count(count: int) -> int:
    if count > MAX_PROMPTS:
        raise BadRequest(f"too many prompts: {count}, at most {MAX_PROMPTS}", param="prompt")
    return count
