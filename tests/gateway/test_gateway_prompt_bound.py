"""The prompt bound against the real thing: R1's tool chat template rendered by transformers'
`apply_chat_template` (what vLLM runs) with the tiny model's byte-level BPE tokenizer. Tool
definitions made of punctuation, empty containers, nulls, escapes and HTML-unsafe characters
must never render to more tokens than the bound the gateway reserves for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from r1nest.gateway.shaping import chat_prompt_bound

transformers = pytest.importorskip("transformers")

TEMPLATE = (Path(__file__).parents[2] / "service/r1nest/engines/chat_templates/tool_chat_template_deepseekr1.jinja").read_text()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from r1nest.tinymodel import write_tiny_model

    directory = write_tiny_model(tmp_path_factory.mktemp("tiny") / "m", arch="deepseek_v3")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def tool(parameters: Any, name: str = "f") -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": "", "parameters": parameters}}


ADVERSARIAL_TOOLS = {
    "empty lists": [tool({"x": [[]] * 5000})],
    "empty objects": [tool({"x": [{}] * 5000})],
    "nulls and bools": [tool({"x": [None, True, False] * 2000})],
    "nested": [tool({"a": [[[[[[[[{}]]]]]]]] * 500})],
    "html-unsafe": [tool({"x": "<>&'" * 2000})],
    "control characters": [tool({"x": "\x01\x02\x1f" * 1000})],
    "non-ascii": [tool({"x": "é中𝄞" * 1000})],
    "many small tools": [tool({}, name=f"f{i}") for i in range(500)],
    "numbers": [tool({"x": [0, 1.5, -1e300, 123456789] * 1000})],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_TOOLS))
def test_rendered_tools_never_exceed_the_bound(tokenizer: Any, name: str) -> None:
    tools = ADVERSARIAL_TOOLS[name]
    messages = [{"role": "user", "content": "hi"}]
    ids = tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE, tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert len(ids) <= chat_prompt_bound(messages, tools), name


def test_tool_calls_with_structured_arguments_stay_bounded(tokenizer: Any) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": [[]] * 3000}}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "{}", "tool_call_id": "c1"},
    ]
    ids = tokenizer.apply_chat_template(messages, tools=[tool({})], chat_template=TEMPLATE, tokenize=True,
                                        add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    assert len(ids) <= chat_prompt_bound(messages, [tool({})])
