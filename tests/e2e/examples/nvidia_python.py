# Copied from NVIDIA's DeepSeek-R1 model card (Prototype, the first Python
# example: openai SDK, reasoning read with getattr(message, "reasoning_content", None)).
# The card prints empty slots: model="", content "", temperature=, top_p=, max_tokens=,
# stream=NaN; here they are ${...}: the served model, a short question, temperature 0.6 (the
# card's recommendation), top_p 0.95 (DeepSeek's, see deepseek-r1-guide.md; the card names none),
# max_tokens 4096, stream False. base_url ("https://integrate.api.nvidia.com/v1") -> ${BASE_URL},
# "$NVIDIA_API_KEY" -> ${API_KEY}. The card's copy lost the indentation of the `if` body
# (a SyntaxError as printed); it is restored, nothing else is changed.
from openai import OpenAI

client = OpenAI(
base_url = "${BASE_URL}",
api_key = "${API_KEY}"
)

completion = client.chat.completions.create(
model="${MODEL}",
messages=[{"role":"user","content":"${CONTENT}"}],
temperature=${TEMPERATURE},
top_p=${TOP_P},
max_tokens=${MAX_TOKENS},
stream=${STREAM}
)

reasoning = getattr(completion.choices[0].message, "reasoning_content", None)
if reasoning:
    print(reasoning)
print(completion.choices[0].message.content)
