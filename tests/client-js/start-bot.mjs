#!/usr/bin/env node
// The real Pipecat JavaScript client (@pipecat-ai/client-js) against a running botdispatch.
//
//   BOTDISPATCH_URL=http://127.0.0.1:7860 BOTDISPATCH_TOKEN=<jwt> node tests/client-js/start-bot.mjs
//   (or: node tests/client-js/start-bot.mjs <base-url> <token>)
//
// What runs for real: PipecatClient.startBotAndConnect / startBot (the POST to /start with the
// caller's headers and requestData, the parsing of the answer, how an error answer becomes the
// StartBotError and onError message an app shows) and the Daily transport's own reading of the
// answer (DailyTransport#_validateConnectionParams: room_url | dailyRoom -> url,
// dailyToken -> token). What is stubbed: the media side. daily-js needs a browser (WebRTC,
// navigator), so a minimal Transport records the connection parameters the Daily transport
// derived instead of joining, and answers the client's client-ready with a bot-ready.
//
// Prints one JSON line per case on stdout:
//   {"case":"start", "ok":true, "response":{...}, "transport":{"url":..,"token":..}, ...}
//   {"case":"unknown_field", "ok":false, "error":{"startBotError","message","status"}, "onError":"..."}
//   {"case":"bad_token", ...}
// Exit code 0 when every case ran to its expected kind of outcome, 1 otherwise.

import {
  LogLevel,
  PipecatClient,
  RTVI_PROTOCOL_VERSION,
  StartBotError,
  Transport,
  logger,
} from "@pipecat-ai/client-js";
import { DailyTransport } from "@pipecat-ai/daily-transport";

const base = (process.argv[2] ?? process.env.BOTDISPATCH_URL ?? "").replace(/\/+$/, "");
const token = process.argv[3] ?? process.env.BOTDISPATCH_TOKEN ?? "";
if (!base || !token) {
  console.error(
    "usage: BOTDISPATCH_URL=<base url> BOTDISPATCH_TOKEN=<jwt> node tests/client-js/start-bot.mjs\n" +
      "   or: node tests/client-js/start-bot.mjs <base url> <jwt>",
  );
  process.exit(2);
}

// The client reads `window?.navigator` to describe the browser it runs in; in Node `window`
// is not declared at all. Set only after the imports above, so daily-js still loads as it does
// outside a browser.
globalThis.window ??= {};
logger.setLevel(LogLevel.ERROR);

const guard = setTimeout(() => {
  console.error("start-bot.mjs: gave up after 30 s");
  process.exit(3);
}, 30_000);

/** A Transport that joins nothing: it keeps what the Daily transport would have joined with. */
class RecordingTransport extends Transport {
  constructor() {
    super();
    this._state = "disconnected";
    this.connectedWith = undefined;
  }

  initialize(options, messageHandler) {
    this._options = options;
    this._onMessage = messageHandler;
    this._callbacks = options.callbacks ?? {};
  }

  async initDevices() {
    this.state = "initialized";
  }

  _validateConnectionParams(connectParams) {
    // The real Daily transport's mapping, on a copy (it rewrites its argument in place).
    const copy = connectParams == null ? connectParams : structuredClone(connectParams);
    return DailyTransport.prototype._validateConnectionParams.call(this, copy);
  }

  async _connect(connectParams) {
    this.connectedWith = connectParams;
    this.state = "connected";
    this._callbacks.onConnected?.();
  }

  async _disconnect() {
    this.state = "disconnected";
  }

  sendReadyMessage() {
    // What a Pipecat bot answers to client-ready over the call.
    this.state = "ready";
    this._onMessage({
      id: "stub-bot-ready",
      label: "rtvi-ai",
      type: "bot-ready",
      data: { version: RTVI_PROTOCOL_VERSION },
    });
  }

  get state() {
    return this._state;
  }

  set state(state) {
    if (this._state !== state) {
      this._state = state;
      this._callbacks.onTransportStateChanged?.(state);
    }
  }

  async getAllMics() {
    return [];
  }
  async getAllCams() {
    return [];
  }
  async getAllSpeakers() {
    return [];
  }
  updateMic() {}
  updateCam() {}
  updateSpeaker() {}
  get selectedMic() {
    return {};
  }
  get selectedCam() {
    return {};
  }
  get selectedSpeaker() {
    return {};
  }
  enableMic() {}
  enableCam() {}
  enableScreenShare() {}
  get isCamEnabled() {
    return false;
  }
  get isMicEnabled() {
    return false;
  }
  get isSharingScreen() {
    return false;
  }
  sendMessage() {}
  tracks() {
    return { local: { audio: undefined, video: undefined } };
  }
}

function newClient() {
  const transport = new RecordingTransport();
  const seen = { botStarted: [], errors: [] };
  const client = new PipecatClient({
    transport,
    enableMic: false,
    enableCam: false,
    callbacks: {
      onBotStarted: (response) => seen.botStarted.push(structuredClone(response)),
      onError: (message) => seen.errors.push(message?.data?.message ?? String(message)),
    },
  });
  return { client, transport, seen };
}

function headers(bearer) {
  // client-js copies `headers.entries()`: it takes a Headers object, not a plain object.
  return new Headers({ Authorization: `Bearer ${bearer}` });
}

function errorOf(e) {
  return {
    startBotError: e instanceof StartBotError,
    message: e?.message ?? String(e),
    status: e?.status ?? null,
  };
}

let failures = 0;
function report(line) {
  console.log(JSON.stringify(line));
}

// 1. A start as an app makes it: startBotAndConnect = startBot (POST /start) + connect.
{
  const { client, transport, seen } = newClient();
  try {
    const ready = await client.startBotAndConnect({
      endpoint: `${base}/start`,
      headers: headers(token),
      requestData: { body: { from: "client-js", greeting: "Hello from the Pipecat JS client" } },
    });
    report({
      case: "start",
      ok: true,
      response: seen.botStarted[0] ?? null,
      botStartedCalls: seen.botStarted.length,
      transport: transport.connectedWith ?? null,
      botReady: ready ?? null,
      state: transport.state,
      errors: seen.errors,
    });
  } catch (e) {
    failures += 1;
    report({ case: "start", ok: false, error: errorOf(e), errors: seen.errors });
  }
  await client.disconnect().catch(() => {});
}

// 2. A refused start: an unknown field in the request. The app sees StartBotError and onError.
for (const [name, bearer, requestData] of [
  ["unknown_field", token, { body: {}, colour: "blue" }],
  ["bad_token", "not-a-jwt", { body: {} }],
]) {
  const { client, transport, seen } = newClient();
  try {
    const response = await client.startBot({
      endpoint: `${base}/start`,
      headers: headers(bearer),
      requestData,
    });
    failures += 1;
    report({ case: name, ok: true, unexpected: "the start succeeded", response });
  } catch (e) {
    report({ case: name, ok: false, error: errorOf(e), onError: seen.errors[0] ?? null, state: transport.state });
  }
  await client.disconnect().catch(() => {});
}

clearTimeout(guard);
process.exit(failures === 0 ? 0 : 1);
