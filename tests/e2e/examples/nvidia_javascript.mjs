// Copied from NVIDIA's DeepSeek-R1 model card (Prototype, the JavaScript
// example: the openai npm package, message?.reasoning_content).
// The card prints empty slots: model "", content "", temperature, top_p, max_tokens, stream;
// here they are ${...}: the served model, a short question, 0.6, 0.95, 4096, false.
// baseURL ('https://integrate.api.nvidia.com/v1') -> ${BASE_URL}, '$NVIDIA_API_KEY' -> ${API_KEY}.
import OpenAI from 'openai';

const openai = new OpenAI({
apiKey: '${API_KEY}',
baseURL: '${BASE_URL}',
})

async function main() {
const completion = await openai.chat.completions.create({
model: "${MODEL}",
messages: [{"role":"user","content":"${CONTENT}"}],
temperature: ${TEMPERATURE},
top_p: ${TOP_P},
max_tokens: ${MAX_TOKENS},
stream: ${STREAM}
})

const reasoning = completion.choices[0]?.message?.reasoning_content;
if (reasoning) process.stdout.write(reasoning + "\n");
process.stdout.write(completion.choices[0]?.message?.content);

}

main();
