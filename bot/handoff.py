"""The `http` handoff of botdispatch's bot contract (README.md, "The bot contract").

The machine boots with no session in it. This module serves, on PORT (default 8080):

    GET  /readyz   200 {"status": "ready"} once the bot can take a session (imports done,
                   models loaded); 503 {"status": "starting" | "busy" | "stopping"} otherwise.
    POST /bot      delivers the one session of this boot. Headers X-Daily-Room-Url,
                   X-Daily-Room-Token, X-Daily-Session-Id and
                   Authorization: Bearer <BOTDISPATCH_HANDOFF_SECRET>; the body is the client's
                   `body`, a JSON object. Answers when the session ends: 200 {} (as Pipecat
                   Cloud's base image does), or 500 {"error": "session_failed"} when the bot
                   failed. Refusals, answered at once:
                     401 unauthorized    missing or wrong secret (checked first)
                     409 session_taken   this boot already has its session
                     503 not_ready       still starting (GET /readyz says when)
                     400 invalid_request body not a JSON object, a missing header, a bad value
                     413 payload_too_large body over MAX_BODY_BYTES

One session per boot, ever: after its session the process exits. On SIGTERM (botdispatch
sends it right after delivering /bot) the listening socket closes at once, the running session
runs to its end, and the process exits; without a session yet it waits SIGTERM_GRACE_SECS for a
/bot already on an open connection (the signal can overtake the request it follows), then
exits. SIGINT cancels the session and exits.

Only aiohttp is needed here (a dependency of pipecat-ai already); what a session is and how it
runs is the caller's: see `HandoffServer`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

DEFAULT_PORT = 8080
# Every interface, IPv6 and IPv4 on one socket: Fly's private network (6PN) is IPv6, a local
# test is often IPv4. (asyncio would make a "::" listener IPv6-only.)
DEFAULT_HOST = "::"
# botdispatch limits `body` to 64 KiB serialized.
MAX_BODY_BYTES = 256 * 1024
SIGTERM_GRACE_SECS = 5.0

STARTING = "starting"
READY = "ready"
BUSY = "busy"
STOPPING = "stopping"


class SessionRefused(ValueError):
    """The delivered session is unusable (bad header or body); the message names the part."""


def _error(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail, "info": detail}, status=status)


def bearer_matches(header: str | None, secret: str) -> bool:
    """Whether `Authorization: Bearer <secret>` was sent (constant-time comparison)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    return hmac.compare_digest(token.strip().encode(), secret.encode())


class HandoffServer:
    """The HTTP side of one boot.

    `parse_session(headers, body)` turns a delivery into a session (raising SessionRefused);
    `run_session(session)` runs it and returns an exit code (0 = ended normally). The process
    may exit once `done` is set; `exit_code` says with what.
    """

    def __init__(
        self,
        *,
        secret: str,
        parse_session: Callable[[Mapping[str, str], dict[str, Any]], Any],
        run_session: Callable[[Any], Awaitable[int]],
        sigterm_grace_secs: float = SIGTERM_GRACE_SECS,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if not secret:
            raise ValueError("the handoff secret is empty")
        self._secret = secret
        self._parse_session = parse_session
        self._run_session = run_session
        self._sigterm_grace_secs = sigterm_grace_secs
        self._log = log or (lambda message: print(f"bot: {message}", file=sys.stderr))
        self._warmed_up = False
        self._draining = False
        self._session_task: asyncio.Task[int] | None = None
        self._grace_task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self.exit_code = 0

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self._session_task is not None:
            return BUSY
        if self._draining:
            return STOPPING
        return READY if self._warmed_up else STARTING

    def mark_ready(self) -> None:
        """Warm-up is over: /readyz answers 200 from now on (until a session is taken)."""
        self._warmed_up = True
        self._log("ready for a session (GET /readyz answers 200)")

    def fail(self, reason: str, code: int = 1) -> None:
        """Warm-up failed: the process exits without ever being ready."""
        self._log(f"cannot take sessions: {reason}")
        self.exit_code = code
        self.done.set()

    def begin_drain(self) -> None:
        """SIGTERM: no new sessions. A running session goes on; without one, exit after the
        grace period unless a /bot already on its way takes this boot's session."""
        if self._draining:
            return
        self._draining = True
        if self._session_task is not None:
            self._log("SIGTERM: finishing the running session, then exiting")
            return
        self._log(f"SIGTERM without a session: exiting in {self._sigterm_grace_secs:g} s")

        async def grace() -> None:
            await asyncio.sleep(self._sigterm_grace_secs)
            if self._session_task is None:
                self.done.set()

        self._grace_task = asyncio.create_task(grace())

    def cancel(self) -> None:
        """SIGINT: cancel the running session (if any) and exit."""
        self._draining = True
        if self._session_task is not None:
            self._session_task.cancel()
        else:
            self.done.set()

    # -- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_post("/bot", self._bot)
        return app

    async def _readyz(self, _request: web.Request) -> web.Response:
        state = self.state
        return web.json_response({"status": state}, status=200 if state == READY else 503)

    async def _bot(self, request: web.Request) -> web.StreamResponse:
        if not bearer_matches(request.headers.get("Authorization"), self._secret):
            return _error(401, "unauthorized", "send Authorization: Bearer <BOTDISPATCH_HANDOFF_SECRET>")
        if self._session_task is not None or self.done.is_set():
            return _error(409, "session_taken", "this machine already has its session (one session per boot)")
        if not self._warmed_up:
            return _error(503, "not_ready", "the bot is still starting; wait for GET /readyz to answer 200")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "payload_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            session = self._parse_session(request.headers, parse_body(raw))
        except SessionRefused as e:
            return _error(400, "invalid_request", str(e))
        # Checked again with no await since the body was read: two deliveries racing for this
        # boot get one session and one 409.
        if self._session_task is not None or self.done.is_set():
            return _error(409, "session_taken", "this machine already has its session (one session per boot)")
        self._session_task = asyncio.create_task(self._run_session(session))
        self._log("session delivered; running it")
        code = await self._await_session()
        if code == 0:
            response = web.json_response({})
        else:
            response = _error(500, "session_failed", f"the bot ended its session with exit code {code}")
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            # The dispatcher's connection is gone (a replica restarted): the session was ours
            # to finish all the same.
            pass
        self.done.set()
        return response

    async def _await_session(self) -> int:
        """The session's exit code; the session survives this request being cancelled."""
        task = self._session_task
        assert task is not None
        try:
            code = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                # This request was cancelled, not the session: it runs on, and the process
                # exits when it ends.
                task.add_done_callback(lambda t: self._session_over(t))
                raise
            code = 1
        except Exception as e:  # noqa: BLE001 - the bot's failure, reported once
            self._log(f"the session failed: {e!r}")
            code = 1
        self.exit_code = code
        self._log(f"session over (exit code {code})")
        return code

    def _session_over(self, task: asyncio.Task[int]) -> None:
        self.exit_code = 1 if task.cancelled() or task.exception() else task.result()
        self.done.set()


def parse_body(raw: bytes) -> dict[str, Any]:
    """The delivered body: a JSON object; empty means {}."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SessionRefused(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise SessionRefused("the body must be a JSON object")
    return body


def dual_stack_socket(port: int) -> socket.socket:
    """A listening socket on every interface for IPv6 and IPv4, or IPv4 only on a host
    without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        address: tuple[Any, ...] = ("::", port)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(
    server: HandoffServer,
    *,
    host: str,
    port: int,
    warm_up: Callable[[], Any] | None = None,
    handle_signals: bool = True,
) -> int:
    """Serves until the boot's session is over (or SIGTERM without one); returns the exit code.
    `warm_up` runs in a thread while /readyz answers 503, so the server answers at once."""
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if host == DEFAULT_HOST:
        site = web.SockSite(runner, dual_stack_socket(port))
    else:
        site = web.TCPSite(runner, host, port)
    await site.start()
    server._log(f"listening on {site.name} (http handoff)")

    def on_sigterm() -> None:
        server.begin_drain()
        # No new connections from here on.
        asyncio.ensure_future(site.stop())

    loop = asyncio.get_running_loop()
    if handle_signals:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        loop.add_signal_handler(signal.SIGINT, server.cancel)
    try:
        if warm_up is not None:
            try:
                await asyncio.to_thread(warm_up)
            except Exception as e:  # noqa: BLE001 - reported, then the process exits
                server.fail(repr(e))
        if not server.done.is_set():
            server.mark_ready()
        await server.done.wait()
    finally:
        if handle_signals:
            loop.remove_signal_handler(signal.SIGTERM)
            loop.remove_signal_handler(signal.SIGINT)
        await runner.cleanup()
    return server.exit_code
