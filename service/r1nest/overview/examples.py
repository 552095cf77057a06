"""The copy-paste examples on the overview page: the one place their text is written.

The page shows exactly what `build_examples` returns, and the tests run exactly that (taken back
out of the rendered page), so a command on the page is a command that has been seen to work.
Each example is a sequence of segments; segments flagged `is_key` hold the API key, so the page
can mask it on screen while copy and reveal give the real text.

Every value put into code is quoted for its language here: the URL and model name are validated
by OverviewContext and then quoted again (shlex / JSON), so nothing from a stack output can
break out of a string literal.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from r1nest.overview.context import KEY_ENV_VAR, OverviewContext

# DeepSeek's recommendations for R1 (README "Usage Recommendations"): temperature 0.5-0.7 with
# 0.6 advised, top-p 0.95, no system prompt, for math ask for steps and a final \boxed{} answer.
TEMPERATURE = 0.6
TOP_P = 0.95
# No max_tokens in the examples: R1 may reason for thousands of tokens, and the right bound is the
# deployment's (its context and max_tokens cap) and the key's (the gateway fills in what it can pay).
# A fixed number would fail on a deployment with a shorter context.
PROMPT = "What is 17 * 24? Please reason step by step, and put your final answer within \\boxed{}."
CREDITS_PROMPT_NOTE = "The x-remaining-credits response header carries the key's balance."


@dataclass(frozen=True, slots=True)
class Segment:
    text: str
    is_key: bool = False


@dataclass(frozen=True, slots=True)
class Example:
    id: str  # "curl", "credits", "python", "javascript", "anthropic"
    title: str
    language: str  # "bash", "python", "javascript"
    filename: str  # what the run hint saves it as ("" for shell one-liners)
    run_hint: str
    segments: tuple[Segment, ...]

    @property
    def code(self) -> str:
        return "".join(s.text for s in self.segments)


class _Builder:
    """Collects segments; `key()` inserts the key (or a reference to KEY_ENV_VAR) for a language."""

    def __init__(self, ctx: OverviewContext, language: str) -> None:
        self._ctx = ctx
        self._language = language
        self._segments: list[Segment] = []

    def text(self, text: str) -> "_Builder":
        if self._segments and not self._segments[-1].is_key:
            self._segments[-1] = Segment(self._segments[-1].text + text)
        else:
            self._segments.append(Segment(text))
        return self

    def key(self, *, quoted: bool = True) -> "_Builder":
        """The key as a string literal; `quoted=False`: bare, inside an open shell "..." string."""
        key = self._ctx.api_key
        if not quoted:
            if key is None:
                return self.text(f"${KEY_ENV_VAR}")
            self._segments.append(Segment(key, is_key=True))
            return self
        if key is None:
            reference = {
                "bash": f'"${KEY_ENV_VAR}"',
                "python": f'os.environ["{KEY_ENV_VAR}"]',
                "javascript": f"process.env.{KEY_ENV_VAR}",
            }[self._language]
            return self.text(reference)
        # the key's alphabet ([A-Za-z0-9._-]) needs no escaping in any of the three languages
        self.text('"')
        self._segments.append(Segment(key, is_key=True))
        return self.text('"')

    def build(self) -> tuple[Segment, ...]:
        return tuple(self._segments)


def _python_client(ctx: OverviewContext, import_line: str, constructor: str, base_url: str) -> _Builder:
    """The opening of a Python example: the SDK's import and its client with the key."""
    b = _Builder(ctx, "python")
    if ctx.api_key is None:
        b.text("import os\n\n")
    b.text(f"{import_line}\n\n")
    b.text(f"client = {constructor}(\n")
    b.text(f"    base_url={json.dumps(base_url)},\n")
    b.text("    api_key=").key().text(",\n")
    b.text(")\n\n")
    return b


def curl_example(ctx: OverviewContext) -> Example:
    body = json.dumps(
        {
            "model": ctx.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
        },
        indent=2,
    )
    b = _Builder(ctx, "bash")
    b.text(f"curl -sS {shlex.quote(ctx.public_endpoint + '/chat/completions')} \\\n")
    b.text('  -H "Content-Type: application/json" \\\n')
    b.text('  -H "Authorization: Bearer ').key(quoted=False).text('" \\\n')
    b.text(f"  -d {shlex.quote(body)}\n")
    return Example(
        id="curl",
        title="curl (one answer, not streamed)",
        language="bash",
        filename="",
        run_hint="Paste into a terminal. The reply's message has reasoning_content and content.",
        segments=b.build(),
    )


def credits_example(ctx: OverviewContext) -> Example:
    b = _Builder(ctx, "bash")
    b.text(f"curl -sS {shlex.quote(ctx.public_endpoint + '/credits')} \\\n")
    b.text('  -H "Authorization: Bearer ').key(quoted=False).text('"\n')
    return Example(
        id="credits",
        title="curl: credits left on the key",
        language="bash",
        filename="",
        run_hint="Answers {\"remaining_credits\": N, ...} and costs nothing.",
        segments=b.build(),
    )


def python_example(ctx: OverviewContext) -> Example:
    b = _python_client(ctx, "from openai import OpenAI", "OpenAI", ctx.public_endpoint)
    b.text(
        "# DeepSeek-R1: no system prompt (put every instruction in the user turn),\n"
        "# temperature 0.6, top_p 0.95.\n"
        "stream = client.chat.completions.create(\n"
        f"    model={json.dumps(ctx.model)},\n"
        f"    messages=[{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}],\n"
        f"    temperature={TEMPERATURE},\n"
        f"    top_p={TOP_P},\n"
        "    stream=True,\n"
        "    stream_options={\"include_usage\": True},\n"
        ")\n\n"
        "# The reasoning arrives first, in delta.reasoning_content; the answer follows in delta.content.\n"
        'print("Thinking:")\n'
        "answering = False\n"
        "for chunk in stream:\n"
        "    if not chunk.choices:  # the last chunk: token usage and the key's credits after this answer\n"
        "        if chunk.usage:\n"
        '            credits = getattr(chunk, "remaining_credits", None)\n'
        '            print(f"\\n\\n[{chunk.usage.total_tokens} tokens; {credits} credits left]", end="")\n'
        "        continue\n"
        "    delta = chunk.choices[0].delta\n"
        '    reasoning = getattr(delta, "reasoning_content", None)\n'
        "    if reasoning:\n"
        '        print(reasoning, end="", flush=True)\n'
        "    if delta.content:\n"
        "        if not answering:\n"
        '            print("\\n\\nAnswer:")\n'
        "            answering = True\n"
        '        print(delta.content, end="", flush=True)\n'
        "print()\n"
    )
    return Example(
        id="python",
        title="Python (openai SDK, streaming)",
        language="python",
        filename="r1_example.py",
        run_hint="pip install openai, save as r1_example.py, run python r1_example.py",
        segments=b.build(),
    )


def javascript_example(ctx: OverviewContext) -> Example:
    b = _Builder(ctx, "javascript")
    b.text('import OpenAI from "openai";\n\n')
    b.text("const client = new OpenAI({\n")
    b.text(f"  baseURL: {json.dumps(ctx.public_endpoint)},\n")
    b.text("  apiKey: ").key().text(",\n")
    b.text("});\n\n")
    b.text(
        "// DeepSeek-R1: no system prompt, temperature 0.6, top_p 0.95.\n"
        "const stream = await client.chat.completions.create({\n"
        f"  model: {json.dumps(ctx.model)},\n"
        f"  messages: [{{ role: \"user\", content: {json.dumps(PROMPT)} }}],\n"
        f"  temperature: {TEMPERATURE},\n"
        f"  top_p: {TOP_P},\n"
        "  stream: true,\n"
        "  stream_options: { include_usage: true },\n"
        "});\n\n"
        "// The reasoning arrives first, in delta.reasoning_content; the answer follows in delta.content.\n"
        'process.stdout.write("Thinking:\\n");\n'
        "let answering = false;\n"
        "for await (const chunk of stream) {\n"
        "  if (chunk.usage && chunk.choices.length === 0) {\n"
        "    // the last chunk: token usage and the key's credits after this answer\n"
        "    process.stdout.write(`\\n\\n[${chunk.usage.total_tokens} tokens; ${chunk.remaining_credits} credits left]`);\n"
        "    continue;\n"
        "  }\n"
        "  const delta = chunk.choices[0]?.delta ?? {};\n"
        "  if (delta.reasoning_content) process.stdout.write(delta.reasoning_content);\n"
        "  if (delta.content) {\n"
        "    if (!answering) {\n"
        '      process.stdout.write("\\n\\nAnswer:\\n");\n'
        "      answering = true;\n"
        "    }\n"
        "    process.stdout.write(delta.content);\n"
        "  }\n"
        "}\n"
        'process.stdout.write("\\n");\n'
    )
    return Example(
        id="javascript",
        title="JavaScript (openai npm package, streaming)",
        language="javascript",
        filename="r1_example.mjs",
        run_hint="npm install openai, save as r1_example.mjs, run node r1_example.mjs",
        segments=b.build(),
    )


# The Messages API requires max_tokens; the gateway lowers it to what the deployment allows (its
# cap and the context left), so one number fits every deployment.
ANTHROPIC_MAX_TOKENS = 8192


def anthropic_example(ctx: OverviewContext) -> Example:
    # the SDK adds /v1/messages itself
    b = _python_client(ctx, "import anthropic", "anthropic.Anthropic", ctx.public_endpoint.removesuffix("/v1"))
    b.text(
        "# Anthropic's Messages API: R1's reasoning arrives in a thinking block, the answer in a text block.\n"
        "with client.messages.stream(\n"
        f"    model={json.dumps(ctx.model)},\n"
        f"    max_tokens={ANTHROPIC_MAX_TOKENS},  # a ceiling: lowered to what this deployment allows\n"
        f"    messages=[{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}],\n"
        ") as stream:  # no temperature here: the gateway applies R1's 0.6 / top_p 0.95\n"
        '    print("Thinking:")\n'
        "    answering = False\n"
        "    credits = None\n"
        "    for event in stream:\n"
        '        if event.type == "content_block_delta" and event.delta.type == "thinking_delta":\n'
        '            print(event.delta.thinking, end="", flush=True)\n'
        '        elif event.type == "content_block_delta" and event.delta.type == "text_delta":\n'
        "            if not answering:\n"
        '                print("\\n\\nAnswer:")\n'
        "                answering = True\n"
        '            print(event.delta.text, end="", flush=True)\n'
        '        elif event.type == "message_delta":  # the end: the key\'s credits after this answer\n'
        '            credits = getattr(event, "remaining_credits", None)\n'
        "    usage = stream.get_final_message().usage\n"
        "tokens = usage.input_tokens + (usage.cache_read_input_tokens or 0) + usage.output_tokens\n"
        'print(f"\\n\\n[{tokens} tokens; {credits} credits left]")\n'
    )
    return Example(
        id="anthropic",
        title="Python (anthropic SDK, Messages API, streaming)",
        language="python",
        filename="r1_anthropic.py",
        run_hint="pip install anthropic, save as r1_anthropic.py, run python r1_anthropic.py",
        segments=b.build(),
    )


def build_examples(ctx: OverviewContext) -> tuple[Example, ...]:
    return (curl_example(ctx), python_example(ctx), javascript_example(ctx), anthropic_example(ctx),
            credits_example(ctx))
