// Drives batchd's HTTP front with the official TypeScript SDK, unchanged; prints what it saw as one JSON line.
// Usage: node front_check.mjs BASE_URL API_KEY
import Anthropic from '@anthropic-ai/sdk';

const [baseURL, apiKey] = process.argv.slice(2);
const client = new Anthropic({ baseURL, apiKey, maxRetries: 0 });
const params = { model: 'claude-haiku-4-5', max_tokens: 32, messages: [{ role: 'user', content: 'from node' }] };

const message = await client.messages.create(params);

let text = '';
const stream = client.messages.stream({ ...params, messages: [{ role: 'user', content: 'node stream' }] });
stream.on('text', (delta) => {
  text += delta;
});
const streamed = await stream.finalMessage();

const beta = await client.beta.messages.create({ ...params, betas: ['output-300k-2026-03-24'] });

let bad = null;
try {
  await client.messages.create({ ...params, max_tokens: 0 });
} catch (error) {
  bad = { status: error.status, type: error.error?.error?.type ?? null, message: error.error?.error?.message ?? null };
}

console.log(JSON.stringify({ message, streamed, text, beta, bad }));
