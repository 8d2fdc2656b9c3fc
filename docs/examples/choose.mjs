// Choose, then Reward, over nextbest's HTTP/JSON door with Node's built-in fetch (Node >= 18).
//
//   nextbest serve --http-port 8080 --init-config scripts/demo.yaml
//   NEXTBEST_HTTP=http://127.0.0.1:8080 node docs/examples/choose.mjs
//
// NEXTBEST_TOKEN, when set, is sent as a Bearer token. A failure is a google.rpc.Status JSON body
// ({"code": 5, "message": "...", "details": []}): printed with its code, and the exit code is 1.

const base = (process.env.NEXTBEST_HTTP ?? "http://127.0.0.1:8080").replace(/\/+$/, "");
const headers = { "Content-Type": "application/json" };
if (process.env.NEXTBEST_TOKEN) headers.Authorization = `Bearer ${process.env.NEXTBEST_TOKEN}`;

function fail(text) {
  console.error(`error: ${text}`);
  process.exit(1);
}

async function call(path, body) {
  let response;
  try {
    response = await fetch(base + path, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (e) {
    fail(`${base} did not answer: ${e.cause?.code ?? e.cause?.message ?? e.message}`);
  }
  const text = await response.text();
  let answer;
  try {
    answer = JSON.parse(text);
  } catch {
    fail(`HTTP ${response.status}, not JSON: ${text.slice(0, 200)}`);
  }
  if (!response.ok) fail(`HTTP ${response.status}, code ${answer.code}: ${answer.message}`);
  return answer;
}

const eventId = `node-${Date.now()}-${Math.floor(Math.random() * 1e6)}`;
const chosen = await call("/v1/placements/app_home_banner:choose", {
  customerId: "c-1042",
  eventId,
  features: [
    { namespace: "customer", name: "segment", text: "youth" },
    { namespace: "customer", name: "tenure_months", number: 14 },
    { namespace: "device", name: "tier", text: "4g" },
  ],
});
console.log(`chosen: ${chosen.armId} (probability ${chosen.probability}, event ${chosen.eventId})`);

// The customer took the offer: reward the decision by its event id.
const rewarded = await call(`/v1/events/${encodeURIComponent(chosen.eventId)}:reward`, { reward: 1 });
console.log(`reward: ${rewarded.status}`);
