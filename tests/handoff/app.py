#!/usr/bin/env python3
"""A stand-in for the server of the Pipecat Cloud base image (``dailyco/pipecat-base``).

What it copies from the base image's public ``app.py`` and ``waiting_server.py``:

* a FastAPI app served by a ``uvicorn.Server`` subclass (the base image's ``WaitingServer``)
  on ``PORT`` (default 8080; here on 127.0.0.1, ``HOST`` to change it);
* ``GET /readyz``: 200 ``{"status": "ok"}`` once the bot can take a session, 503
  ``{"status": "not ready"}`` before (a bot.py ``readyz()`` override; here: until
  ``STARTUP_SECS`` have passed since the process started);
* ``POST /bot``: the session in the headers ``X-Daily-Room-Url``, ``X-Daily-Room-Token``,
  ``X-Daily-Session-Id`` and the JSON body; the handler awaits the user's ``bot()`` coroutine and
  answers ``{}`` only when the session ends. ``Authorization`` is ignored. A client that
  disconnects does not end the session (uvicorn does not cancel a running handler). Nothing
  stops a second ``/bot`` after (or during) a session: the app does not enforce single use;
* on SIGTERM uvicorn closes its listening socket (new connections are refused), waits for the
  running ``/bot`` (the session) to finish, runs the lifespan shutdown and exits; uvicorn then
  re-raises the signal, so the process ends killed by SIGTERM.

The stub ``bot()`` prints one line when a session starts and one when it ends, and "talks" for
``SESSION_SECS`` (default 5). Lines are ``[pcbase <session id>] ...`` (``-`` for the server).
"""

import asyncio
import json
import os
import signal
import sys
import time
from typing import Annotated, Optional

import uvicorn
import uvicorn.server
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse

PROCESS_STARTED = time.monotonic()
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8080"))
SESSION_SECS = float(os.environ.get("SESSION_SECS", "5"))
STARTUP_SECS = float(os.environ.get("STARTUP_SECS", "0"))
SHUTDOWN_TIMEOUT = float(os.environ.get("SHUTDOWN_TIMEOUT", "7200"))

app = FastAPI()
sessions_started = 0


def log(tag: str, message: str) -> None:
    print(f"[pcbase {tag}] {message}", flush=True)


async def bot(session_id: str, room_url: Optional[str], token: Optional[str], body: dict) -> None:
    """The user's bot: joins the room and talks for SESSION_SECS."""
    global sessions_started
    sessions_started += 1
    started = time.monotonic()
    log(
        session_id,
        f"session started room={room_url or '<none>'} port={PORT} pid={os.getpid()} "
        f"n={sessions_started} token_chars={len(token or '')} body={json.dumps(body, sort_keys=True)}",
    )
    await asyncio.sleep(SESSION_SECS)
    log(session_id, f"session ended after {time.monotonic() - started:.2f} s")


@app.get("/readyz")
async def readyz() -> JSONResponse:
    if time.monotonic() - PROCESS_STARTED >= STARTUP_SECS:
        return JSONResponse(content={"status": "ok"}, status_code=200)
    return JSONResponse(content={"status": "not ready"}, status_code=503)


@app.get("/livez")
async def livez() -> JSONResponse:
    return JSONResponse(content={"status": "ok"}, status_code=200)


@app.post("/bot")
async def handle_bot_request(
    body: dict,
    x_daily_room_url: Annotated[Optional[str], Header()] = None,
    x_daily_room_token: Annotated[Optional[str], Header()] = None,
    x_daily_session_id: Annotated[Optional[str], Header()] = None,
) -> dict:
    session_id = x_daily_session_id or "NONE"
    try:
        await bot(session_id, x_daily_room_url, x_daily_room_token, body)
    except Exception as e:  # the base image logs and still answers {}
        log(session_id, f"exception running bot(): {e}")
    return {}


class WaitingServer(uvicorn.server.Server):
    """The base image's shutdown: stop accepting, then wait for connections and tasks (the
    running sessions) up to SHUTDOWN_TIMEOUT, then the lifespan shutdown."""

    def handle_exit(self, sig, frame) -> None:
        # A signal handler runs between two bytecodes of whatever was running, perhaps inside
        # a print to stdout: printing here again would raise "reentrant call" in that code (it
        # did, in a session's log line). os.write goes around sys.stdout's buffer; log flushes
        # every line, so the order holds.
        name = signal.Signals(sig).name
        line = f"[pcbase -] pid={os.getpid()} signal {name}: shutting down after the running session"
        os.write(sys.stdout.fileno(), (line + "\n").encode())
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        deadline = time.time() + SHUTDOWN_TIMEOUT
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for server in self.servers:
            await server.wait_closed()
        log("-", f"pid={os.getpid()} listener closed: new connections are refused")
        while self.server_state.connections and not self.force_exit and time.time() < deadline:
            await asyncio.sleep(0.1)
        while self.server_state.tasks and not self.force_exit and time.time() < deadline:
            await asyncio.sleep(0.1)
        if not self.force_exit:
            await self.lifespan.shutdown()
        log("-", f"pid={os.getpid()} server stopped after {sessions_started} session(s); exiting")


def main() -> None:
    config = uvicorn.Config(app, host=HOST, port=PORT, log_level="warning")
    server = WaitingServer(config)
    log("-", f"pid={os.getpid()} listening on {HOST}:{PORT} (python {sys.version.split()[0]})")
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
