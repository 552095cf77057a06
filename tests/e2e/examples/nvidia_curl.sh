# Copied from NVIDIA's DeepSeek-R1 model card (Prototype, the curl
# example: -i, Accept: application/json, --silent -w "\n%{http_code}"; no model, no max_tokens).
# invoke_url ('https://integrate.api.nvidia.com/v1/chat/completions') -> ${BASE_URL}/chat/completions;
# the key after 'Bearer ' (empty on the card) -> ${API_KEY}; content "" -> ${CONTENT}.
invoke_url='${BASE_URL}/chat/completions'

authorization_header='Authorization: Bearer ${API_KEY}'
accept_header='Accept: application/json'
content_type_header='Content-Type: application/json'

data=$'{
"messages": [
{
"role": "user",
"content": "${CONTENT}"
}
]
}'

response=$(curl --silent -i -w "\n%{http_code}" --request POST \
--url "$invoke_url" \
--header "$authorization_header" \
--header "$accept_header" \
--header "$content_type_header" \
--data "$data"
)

echo "$response"
