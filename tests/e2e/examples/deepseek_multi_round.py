# After DeepSeek's API guide "Multi-round Conversation" (api-docs.deepseek.com/guides/multi_round_chat):
# each round appends the model's reply to `messages` and sends the whole history again. Its
# example appends response.choices[0].message, the SDK object, which for R1 carries
# reasoning_content; many clients also copy the reasoning into the assistant turn themselves.
# Both are done here (no max_tokens, as in the guide). The gateway drops reasoning_content from
# input turns (the chat template cuts earlier reasoning anyway), so every round must succeed.
# Placeholders: ${BASE_URL}, ${API_KEY}, ${MODEL}.
from openai import OpenAI

client = OpenAI(api_key="${API_KEY}", base_url="${BASE_URL}")

# Round 1
messages = [{"role": "user", "content": "Which is larger, 9.11 or 9.8?"}]
response = client.chat.completions.create(model="${MODEL}", messages=messages)
message = response.choices[0].message
print(f"Round 1 reasoning: {message.reasoning_content}")
print(f"Round 1 answer: {message.content}")

# Round 2: the assistant turn sent back with its reasoning_content
messages.append({"role": "assistant", "content": message.content,
                 "reasoning_content": message.reasoning_content})
messages.append({"role": "user", "content": "And which is larger, 9.11 or 9.9?"})
response = client.chat.completions.create(model="${MODEL}", messages=messages)
message = response.choices[0].message
print(f"Round 2 reasoning: {message.reasoning_content}")
print(f"Round 2 answer: {message.content}")

# Round 3: the SDK's message object appended as it is (as in DeepSeek's guide)
messages.append(response.choices[0].message)
messages.append({"role": "user", "content": "Thanks! One more: 9.11 or 9.10?"})
response = client.chat.completions.create(model="${MODEL}", messages=messages)
message = response.choices[0].message
print(f"Round 3 reasoning: {message.reasoning_content}")
print(f"Round 3 answer: {message.content}")
