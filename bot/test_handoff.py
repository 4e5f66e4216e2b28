"""Tests of the http handoff (handoff.py) with aiohttp's test client: no Daily, no Pipecat; the
session is a stand-in the test controls.

Run: python3 -m unittest discover -s bot -p 'test_*.py'   (needs aiohttp; scripts/test
installs the version bot/requirements.txt pins)
"""

import asyncio
import os
import socket
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from aiohttp import ClientSession  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

import bot  # noqa: E402
import handoff  # noqa: E402

SECRET = "handoff-secret-0123456789abcdef"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.bot-owner-token.sig"
AUTH = {"Authorization": f"Bearer {SECRET}"}
DELIVERY = {
    **AUTH,
    "X-Daily-Room-Url": "https://example.daily.co/bd-01k0warm",
    "X-Daily-Room-Token": TOKEN,
    "X-Daily-Session-Id": "01k0warm",
    "Content-Type": "application/json",
}


class FakeSessions:
    """Stands in for the bot: records each session and ends it when the test says so."""

    def __init__(self, code=0):
        self.started = []
        self.release = asyncio.Event()
        self.code = code

    def parse(self, headers, body):
        try:
            return bot.config_from_handoff(headers, body, {})
        except bot.ConfigError as e:
            raise handoff.SessionRefused(str(e)) from None

    async def run(self, config):
        self.started.append(config)
        await self.release.wait()
        if isinstance(self.code, Exception):
            raise self.code
        return self.code


class HandoffTest(unittest.IsolatedAsyncioTestCase):
    async def start(self, *, ready=True, code=0, grace=5.0):
        self.sessions = FakeSessions(code)
        self.server = handoff.HandoffServer(
            secret=SECRET,
            parse_session=self.sessions.parse,
            run_session=self.sessions.run,
            sigterm_grace_secs=grace,
            log=lambda _message: None,
        )
        if ready:
            self.server.mark_ready()
        self.client = TestClient(TestServer(self.server.app()))
        await self.client.start_server()
        self.addAsyncCleanup(self.client.close)

    async def readyz(self):
        resp = await self.client.get("/readyz")
        return resp.status, await resp.json()

    async def deliver(self, headers=DELIVERY, body='{"greeting": "Hi from the client"}'):
        resp = await self.client.post("/bot", headers=headers, data=body)
        return resp.status, await resp.json()

    async def wait_for_session(self):
        for _ in range(200):
            if self.sessions.started:
                return self.sessions.started[0]
            await asyncio.sleep(0.01)
        self.fail("the session never started")

    async def test_readyz_says_when_a_session_can_be_taken(self):
        await self.start(ready=False)
        self.assertEqual(await self.readyz(), (503, {"status": "starting"}))
        self.server.mark_ready()
        self.assertEqual(await self.readyz(), (200, {"status": "ready"}))

    async def test_a_delivery_runs_the_session_and_answers_when_it_ends(self):
        await self.start()
        delivery = asyncio.create_task(self.deliver())
        config = await self.wait_for_session()
        self.assertEqual(config.room_url, "https://example.daily.co/bd-01k0warm")
        self.assertEqual(config.token, TOKEN)
        self.assertEqual(config.session_id, "01k0warm")
        self.assertEqual(config.greeting, "Hi from the client")
        await asyncio.sleep(0.05)
        self.assertFalse(delivery.done(), "the answer comes when the session ends")
        self.assertEqual(await self.readyz(), (503, {"status": "busy"}))
        self.sessions.release.set()
        self.assertEqual(await delivery, (200, {}))
        self.assertTrue(self.server.done.is_set(), "one session per boot: the process exits")
        self.assertEqual(self.server.exit_code, 0)

    async def test_the_secret_is_required(self):
        await self.start()
        for auth in (None, "Bearer wrong", f"Basic {SECRET}", "Bearer", f"bearer {SECRET}x"):
            headers = {k: v for k, v in DELIVERY.items() if k != "Authorization"}
            if auth is not None:
                headers["Authorization"] = auth
            with self.subTest(auth=auth):
                status, body = await self.deliver(headers)
                self.assertEqual(status, 401)
                self.assertEqual(body["error"], "unauthorized")
                self.assertNotIn(SECRET, str(body))
        self.assertEqual(self.sessions.started, [])
        self.assertEqual(await self.readyz(), (200, {"status": "ready"}))

    async def test_the_secret_is_checked_before_anything_else(self):
        await self.start(ready=False)
        status, _ = await self.deliver({"Authorization": "Bearer wrong"}, body="not json")
        self.assertEqual(status, 401)

    async def test_a_second_session_is_refused(self):
        await self.start()
        first = asyncio.create_task(self.deliver())
        await self.wait_for_session()
        status, body = await self.deliver()
        self.assertEqual((status, body["error"]), (409, "session_taken"))
        self.sessions.release.set()
        self.assertEqual((await first)[0], 200)
        # Even after the session: one session per boot, ever.
        status, body = await self.deliver()
        self.assertEqual((status, body["error"]), (409, "session_taken"))
        self.assertEqual(len(self.sessions.started), 1)

    async def test_two_racing_deliveries_get_one_session(self):
        await self.start()
        racing = [asyncio.create_task(self.deliver()) for _ in range(5)]
        await self.wait_for_session()
        await asyncio.sleep(0.05)
        self.sessions.release.set()
        statuses = sorted([(await r)[0] for r in racing])
        self.assertEqual(statuses, [200, 409, 409, 409, 409])
        self.assertEqual(len(self.sessions.started), 1)

    async def test_not_ready_yet(self):
        await self.start(ready=False)
        status, body = await self.deliver()
        self.assertEqual((status, body["error"]), (503, "not_ready"))

    async def test_bad_deliveries_are_refused_and_leave_the_machine_ready(self):
        await self.start()
        without_room = {k: v for k, v in DELIVERY.items() if k != "X-Daily-Room-Url"}
        cases = [
            (DELIVERY, "[1, 2]", "JSON object"),
            (DELIVERY, "{not json", "not valid JSON"),
            (DELIVERY, '{"greeting": 5}', "body.greeting"),
            (without_room, "{}", "X-Daily-Room-Url"),
            ({**DELIVERY, "X-Daily-Room-Url": "ftp://x/y"}, "{}", "X-Daily-Room-Url"),
        ]
        for headers, body, named in cases:
            with self.subTest(body=body, named=named):
                status, answer = await self.deliver(headers, body)
                self.assertEqual((status, answer["error"]), (400, "invalid_request"))
                self.assertIn(named, answer["detail"])
                self.assertEqual(answer["info"], answer["detail"])
                self.assertNotIn(TOKEN, answer["detail"])
        self.assertEqual(self.sessions.started, [])
        self.assertEqual(await self.readyz(), (200, {"status": "ready"}))

    async def test_an_empty_body_is_an_empty_object(self):
        await self.start()
        delivery = asyncio.create_task(self.deliver(body=""))
        config = await self.wait_for_session()
        self.assertEqual(config.body, {})
        self.sessions.release.set()
        self.assertEqual(await delivery, (200, {}))

    async def test_a_body_too_large(self):
        await self.start()
        big = '{"x": "' + "a" * handoff.MAX_BODY_BYTES + '"}'
        status, answer = await self.deliver(body=big)
        self.assertEqual((status, answer["error"]), (413, "payload_too_large"))

    async def test_a_failed_session_answers_an_error(self):
        for code in (1, RuntimeError("crashed")):
            with self.subTest(code=code):
                await self.start(code=code)
                delivery = asyncio.create_task(self.deliver())
                await self.wait_for_session()
                self.sessions.release.set()
                status, answer = await delivery
                self.assertEqual((status, answer["error"]), (500, "session_failed"))
                self.assertEqual(self.server.exit_code, 1)
                self.assertTrue(self.server.done.is_set())

    async def test_sigterm_lets_the_running_session_finish(self):
        await self.start()
        delivery = asyncio.create_task(self.deliver())
        await self.wait_for_session()
        self.server.begin_drain()
        await asyncio.sleep(0.05)
        self.assertFalse(self.server.done.is_set(), "the session runs on")
        status, body = await self.deliver()
        self.assertEqual((status, body["error"]), (409, "session_taken"))
        self.sessions.release.set()
        self.assertEqual(await delivery, (200, {}))
        self.assertTrue(self.server.done.is_set())

    async def test_sigterm_without_a_session_exits_after_the_grace(self):
        await self.start(grace=0.1)
        self.server.begin_drain()
        self.assertEqual(await self.readyz(), (503, {"status": "stopping"}))
        await asyncio.wait_for(self.server.done.wait(), 2)
        self.assertEqual(self.server.exit_code, 0)

    async def test_a_delivery_overtaken_by_its_sigterm_still_runs(self):
        # botdispatch signals right after delivering: the signal may arrive first.
        await self.start(grace=0.5)
        self.server.begin_drain()
        delivery = asyncio.create_task(self.deliver())
        await self.wait_for_session()
        await asyncio.sleep(0.7)
        self.assertFalse(self.server.done.is_set(), "the grace does not end a session")
        self.sessions.release.set()
        self.assertEqual(await delivery, (200, {}))

    async def test_sigint_cancels_the_session(self):
        await self.start()
        delivery = asyncio.create_task(self.deliver())
        await self.wait_for_session()
        self.server.cancel()
        status, answer = await delivery
        self.assertEqual((status, answer["error"]), (500, "session_failed"))
        self.assertTrue(self.server.done.is_set())

    async def test_the_session_survives_the_dispatcher_hanging_up(self):
        await self.start()
        delivery = asyncio.create_task(self.deliver())
        await self.wait_for_session()
        delivery.cancel()
        await asyncio.sleep(0.1)
        self.assertFalse(self.server.done.is_set())
        self.sessions.release.set()
        await asyncio.wait_for(self.server.done.wait(), 2)
        self.assertEqual(self.server.exit_code, 0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeTest(unittest.IsolatedAsyncioTestCase):
    """`serve`: the whole boot on a real loopback port, warm-up included."""

    async def test_a_boot_warms_up_serves_one_session_and_exits(self):
        sessions = FakeSessions()
        server = handoff.HandoffServer(
            secret=SECRET, parse_session=sessions.parse, run_session=sessions.run, log=lambda _m: None
        )
        warming = threading.Event()
        port = free_port()
        serving = asyncio.create_task(
            handoff.serve(server, host="127.0.0.1", port=port, warm_up=warming.wait, handle_signals=False)
        )
        base = f"http://127.0.0.1:{port}"
        async with ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{base}/readyz") as resp:
                        self.assertEqual(resp.status, 503, "still warming up")
                        break
                except OSError:
                    await asyncio.sleep(0.02)
            warming.set()
            for _ in range(100):
                async with http.get(f"{base}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.02)
            else:
                self.fail("never ready")
            delivered = asyncio.create_task(http.post(f"{base}/bot", headers=DELIVERY, data="{}"))
            for _ in range(200):
                if sessions.started:
                    break
                await asyncio.sleep(0.01)
            sessions.release.set()
            resp = await delivered
            self.assertEqual((resp.status, await resp.json()), (200, {}))
            resp.release()
        self.assertEqual(await asyncio.wait_for(serving, 5), 0)

    async def test_the_default_host_takes_ipv4_too(self):
        # "::" alone would be IPv6-only under asyncio; Fly's 6PN is IPv6, local tests IPv4.
        server = handoff.HandoffServer(
            secret=SECRET, parse_session=lambda h, b: None, run_session=None, log=lambda _m: None
        )
        port = free_port()
        serving = asyncio.create_task(handoff.serve(server, host=handoff.DEFAULT_HOST, port=port, handle_signals=False))
        async with ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        self.assertEqual(resp.status, 200)
                        break
                except OSError:
                    await asyncio.sleep(0.02)
            else:
                self.fail("nothing listens on 127.0.0.1")
        server.cancel()
        self.assertEqual(await asyncio.wait_for(serving, 5), 0)

    async def test_a_failed_warm_up_exits_without_ever_being_ready(self):
        sessions = FakeSessions()
        server = handoff.HandoffServer(
            secret=SECRET, parse_session=sessions.parse, run_session=sessions.run, log=lambda _m: None
        )

        def broken():
            raise ImportError("no module named pipecat")

        code = await asyncio.wait_for(
            handoff.serve(server, host="127.0.0.1", port=free_port(), warm_up=broken, handle_signals=False), 5
        )
        self.assertEqual(code, 1)
        self.assertEqual(sessions.started, [])


class BearerTest(unittest.TestCase):
    def test_bearer_matches(self):
        self.assertTrue(handoff.bearer_matches(f"Bearer {SECRET}", SECRET))
        self.assertTrue(handoff.bearer_matches(f"bearer  {SECRET} ", SECRET))
        for header in (None, "", SECRET, f"Token {SECRET}", "Bearer ", f"Bearer {SECRET[:-1]}"):
            self.assertFalse(handoff.bearer_matches(header, SECRET), header)


if __name__ == "__main__":
    unittest.main()
