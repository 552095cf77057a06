# Copied from NVIDIA's DeepSeek-R1 model card (Prototype, the LangChain
# example: ChatNVIDIA, reasoning read from response.additional_kwargs["reasoning_content"]).
# The card prints empty slots: model="", temperature=, top_p=, max_tokens=, content ""; here
# they are ${...}: the served model, 0.6, 0.95, 4096, a short question. "$NVIDIA_API_KEY" ->
# ${API_KEY}. Added: base_url="${BASE_URL}" (the card relies on ChatNVIDIA's default, NVIDIA's
# hosted endpoint; a self-hosted NIM is reached with base_url=). The card's copy lost the
# indentation of the `if` body (a SyntaxError as printed); it is restored.
from langchain_nvidia_ai_endpoints import ChatNVIDIA

client = ChatNVIDIA(
model="${MODEL}",
base_url="${BASE_URL}",
api_key="${API_KEY}", 
temperature=${TEMPERATURE},
top_p=${TOP_P},
max_tokens=${MAX_TOKENS},
)

response = client.invoke([{"role":"user","content":"${CONTENT}"}])
if response.additional_kwargs and "reasoning_content" in response.additional_kwargs:
    print(response.additional_kwargs["reasoning_content"])
print(response.content)
