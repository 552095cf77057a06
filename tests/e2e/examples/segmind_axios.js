// Copied from Segmind's DeepSeek-R1 API page (the API example, axios), line
// breaks restored (the page lost them; the statements are unchanged). As printed: x-api-key, no
// model, no max_tokens, user / assistant / user turns, console.log(response.data).
// "YOUR API-KEY" -> ${API_KEY}; the url ("https://api.segmind.com/v1/deepseek-reasoner") ->
// ${URL}, the gateway's chat completions endpoint.
const axios = require('axios');
const api_key = "${API_KEY}";
const url = "${URL}";

const data = {
  "messages": [
    {
      "role": "user",
      "content": "tell me a joke on cats"
    },
    {
      "role": "assistant",
      "content": "here is a joke about cats..."
    },
    {
      "role": "user",
      "content": "now a joke on dogs"
    }
  ]
};

(async function() {
    try {
        const response = await axios.post(url, data, { headers: { 'x-api-key': api_key } });
        console.log(response.data);
    } catch (error) {
        console.error('Error:', error.response.data);
    }
})();
