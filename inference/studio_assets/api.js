// The HTTP API as the page uses it: the key (this tab's sessionStorage only), requests with x-api-key, what the
// server can do (read from /openapi.json, so the page works before and after a field is added), and a plain
// sentence for every refusal.

const KEY_NAME = "qwen-lora-api-key";

export const key = {
  get: () => sessionStorage.getItem(KEY_NAME) || "",
  set: (value) => sessionStorage.setItem(KEY_NAME, value),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

export class ApiError extends Error {
  constructor(status, message, retryAfter = null, detail = null) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
    this.detail = detail;
  }
}

// fetch with the key; a non-2xx answer becomes an ApiError carrying a readable message.
// `names` maps image indices to file names so a bad file is named in the message.
export async function call(path, { method = "GET", body = null, names = [] } = {}) {
  const headers = { "x-api-key": key.get() };
  if (body !== null) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === null ? null : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "Cannot reach the service (is `qwen-lora serve` running?).");
  }
  if (!response.ok) throw await refusal(response, names);
  return response;
}

export async function json(path) {
  return (await call(path)).json();
}

async function refusal(response, names) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch (e) {
    detail = null;
  }
  const status = response.status;
  const retryAfter = response.headers.get("retry-after");
  return new ApiError(status, explain(status, detail, retryAfter, names), retryAfter ? Number(retryAfter) : null, detail);
}

const FIELD_LABELS = {
  prompt: "Prompt", negative_prompt: "Negative prompt", num_inference_steps: "Steps", guidance_scale: "Guidance",
  seed: "Seed", width: "Width", height: "Height", aspect_ratio: "Aspect ratio", mask: "Mask", mask_feather: "Feather",
};

export function explain(status, detail, retryAfter, names = []) {
  const items = Array.isArray(detail) ? detail : [{ loc: [], msg: typeof detail === "string" ? detail : "" }];
  const lines = items.map((d) => describe(d.loc || [], d.msg || "", names));
  const text = lines.filter(Boolean).join(" ");
  switch (status) {
    case 401: return "The API key was refused: enter a valid key at the top of the page.";
    case 413: return `Too large: ${text || "the request is over the service's size limit"}. Use smaller or fewer images.`;
    case 429: return `The service is busy (its queue is full). Try again in ${retryAfter || "a few"} s.`;
    case 404: return `Not found: ${text}`;
    default:
      if (status >= 500) return `The service failed (HTTP ${status}); its log says why.`;
      return `Refused (HTTP ${status}): ${text || "the request was not accepted"}`;
  }
}

function describe(loc, msg, names) {
  const path = loc[0] === "body" ? loc.slice(1) : loc;
  if (path[0] === "image") {
    const name = names[typeof path[1] === "number" ? path[1] : 0];
    return `bad file${name ? ` “${name}”` : ""}: ${msg}`;
  }
  if (path[0] === "loras") return `unknown or bad adapter: ${msg}`;
  const label = FIELD_LABELS[path[0]] || path.join(".");
  return label ? `${label}: ${msg}` : msg;
}

// What this server offers, from its OpenAPI document (open, no key needed).
export async function capabilities() {
  const caps = { mask: false, layers: null, maxSteps: 100, maxGuidance: 20, maxWeight: 4, aspects: ["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"] };
  let spec;
  try {
    spec = await (await fetch("/openapi.json")).json();
  } catch (e) {
    return caps;
  }
  const props = bodyProperties(spec, "/v1/images");
  caps.mask = "mask" in props;
  caps.maxSteps = props.num_inference_steps?.anyOf?.[0]?.maximum ?? props.num_inference_steps?.maximum ?? caps.maxSteps;
  caps.maxGuidance = props.guidance_scale?.anyOf?.[0]?.maximum ?? props.guidance_scale?.maximum ?? caps.maxGuidance;
  const weight = spec.components?.schemas?.LoraRef?.properties?.weight;
  caps.maxWeight = weight?.anyOf?.[0]?.maximum ?? weight?.maximum ?? caps.maxWeight;
  const aspects = props.aspect_ratio?.anyOf?.[0]?.enum ?? props.aspect_ratio?.enum;
  if (aspects) caps.aspects = aspects;
  if (spec.paths?.["/v1/layers"]?.post) {
    const layerProps = bodyProperties(spec, "/v1/layers");
    const formatField = Object.keys(layerProps).find((k) => enumOf(layerProps[k])?.includes("psd"));
    caps.layers = { fields: Object.keys(layerProps), formatField, formats: formatField ? enumOf(layerProps[formatField]) : [] };
  }
  return caps;
}

function enumOf(prop) {
  return prop?.enum ?? prop?.anyOf?.find((p) => p.enum)?.enum;
}

function bodyProperties(spec, path) {
  const schema = spec.paths?.[path]?.post?.requestBody?.content?.["application/json"]?.schema;
  const resolved = schema?.$ref ? spec.components?.schemas?.[schema.$ref.split("/").pop()] : schema;
  return resolved?.properties || {};
}

// Queued vs generating while `promise` is pending: /healthz says how many jobs wait for the model worker.
export async function watchQueue(promise, onState) {
  let done = false;
  promise.then(() => { done = true; }, () => { done = true; });
  onState("Sending…");
  while (!done) {
    await new Promise((resolve) => setTimeout(resolve, 400));
    if (done) break;
    try {
      const health = await (await fetch("/healthz")).json();
      if (!done) onState(health.queue > 0 ? `Queued: ${health.queue} job(s) waiting for the model…` : "Generating…");
    } catch (e) {
      /* the state line is a hint; the request itself reports failures */
    }
  }
  return promise;
}

export function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0] & 0x7fffffff;
}

// "copy as curl": the key comes from the environment, never from the page: from the variable the server reads its
// keys from (serve.api_keys_env, a comma-separated list: the first key is sent). --fail: a refusal is an error,
// not a result file holding the refusal's JSON.
export function asCurl(path, body, outFile, keyEnv = "QWEN_LORA_API_KEYS") {
  const url = new URL(path, location.href).href;
  const name = /^[A-Za-z_][A-Za-z0-9_]*$/.test(keyEnv) ? keyEnv : "QWEN_LORA_API_KEYS"; // a shell variable name only
  return `curl -sS --fail -X POST '${url}' -H "x-api-key: \${${name}%%,*}" -H 'content-type: application/json' ` +
    `--data-binary @- -o '${outFile}' <<'JSON'\n${JSON.stringify(body)}\nJSON\n`;
}

export function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}
