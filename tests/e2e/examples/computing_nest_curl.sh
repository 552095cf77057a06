# Copied from Alibaba Cloud Computing Nest's DeepSeek-R1 service guide ("Curl Command Call"),
# as printed: `-X Post`, the long letter prompt, no max_tokens, the doc's port 8000.
# Placeholders (the doc's own): ${ServerIP}:8000 -> the test server's 127.0.0.1:<port>, ${ApiKey},
# ${ModelName} -> the served model. Nothing else is changed.
curl -X Post http://${ServerIP}:8000/v1/chat/completions \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${ApiKey}" \
  -d '{
    "model": "${ModelName}",
    "messages": [
      {
        "role": "user",
        "content": "Write a letter to my daughter from the future year 2035, telling her to study technology well, become the master of technology, and promote technological and economic development; she is currently in 3rd grade"
      }
    ]
  }'
