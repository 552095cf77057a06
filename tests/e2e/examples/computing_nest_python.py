# Copied from Alibaba Cloud Computing Nest's DeepSeek-R1 service guide ("Python SDK Call"),
# as printed: content parts, max_completion_tokens=1024, stream=True and
# print(chunk.choices[0].delta.content, end=""), the model id taken from client.models.list().
# Placeholders (the doc's own): ${ApiKey}; ${ServerUrl} -> the gateway's URL with /v1.
from openai import OpenAI

##### API Configuration #####
openai_api_key = "${ApiKey}"
openai_api_base = "${ServerUrl}"

client = OpenAI(
    api_key=openai_api_key,
    base_url=openai_api_base,
)

models = client.models.list()
model = models.data[0].id
print(model)


def main():
    stream = True

    chat_completion = client.chat.completions.create(
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "Hello, please introduce yourself in as much detail as possible.",
                    }
                ],
            }
        ],
        model=model,
        max_completion_tokens=1024,
        stream=stream,
    )

    if stream:
        for chunk in chat_completion:
            print(chunk.choices[0].delta.content, end="")
    else:
        result = chat_completion.choices[0].message.content
        print(result)


if __name__ == "__main__":
    main()
