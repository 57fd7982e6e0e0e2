"""The web UI's files at /ui/ and the small API additions it lives on."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
from yarl import URL

from helpers import chat, eventually, running

UI = Path(__file__).resolve().parent.parent / "ui_assets"


async def test_the_app_pages_serve_index_html_and_files_serve_themselves(in_process, upstreams):
    ls = await in_process({"models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    index = (UI / "index.html").read_bytes()
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/ui", allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"] == "/ui/"
        for page in ("/ui/", "/ui/models", "/ui/logs", "/ui/captures/12"):
            async with s.get(ls.url + page) as r:
                assert r.status == 200 and r.content_type == "text/html", page
                assert await r.read() == index
        async with s.get(ls.url + "/ui/app.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            assert await r.read() == (UI / "app.js").read_bytes()
            etag = r.headers["ETag"]
        async with s.get(ls.url + "/ui/app.js", headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        async with s.get(ls.url + "/ui/missing.js") as r:
            assert r.status == 404
        async with s.get(ls.url + "/ui/__init__.py") as r:
            assert r.status == 404  # the package marker is not part of the UI
        async with s.get(URL(ls.url + "/ui/%2e%2e/llama_swap.py", encoded=True), allow_redirects=False) as r:
            assert r.status == 301 and r.headers["Location"] == "/llama_swap.py"  # then a plain 404
        async with s.get(ls.url + "/favicon.ico") as r:
            assert r.status == 200 and r.content_type == "image/svg+xml"


async def test_the_ui_takes_an_admin_key_and_asks_the_browser_for_one(in_process, upstreams):
    ls = await in_process({"apiKeys": ["k"], "models": {"m": {"cmd": upstreams.cmd(name="m")}}})
    async with aiohttp.ClientSession() as s:
        async with s.get(ls.url + "/ui/") as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="llama-swap"'
        async with s.get(ls.url + "/ui/",
                         headers={"Authorization": "Basic " + base64.b64encode(b"anyone:k").decode()}) as r:
            assert r.status == 200
        async with s.get(ls.url + "/favicon.ico") as r:
            assert r.status == 200


async def test_load_starts_a_model_and_running_shows_queue_inflight_and_ttl(in_process, upstreams):
    ls = await in_process({"healthCheckTimeout": 15, "models": {
        "m": {"cmd": upstreams.cmd(name="m"), "ttl": 300}, "other": {"cmd": upstreams.cmd(name="other")}}})
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/api/models/load/m") as r:
            assert r.status == 200 and await r.json() == {"msg": "ok"}
        [entry] = await running(s, ls)
        assert entry["model"] == "m" and entry["state"] == "ready"
        assert entry["in_flight"] == 0 and entry["queued"] == 0 and 295 <= entry["ttl_remaining"] <= 300
        busy = asyncio.create_task(chat(s, ls, "m", responder_sleep=2))

        async def serving() -> bool:
            return (await running(s, ls))[0]["in_flight"] == 1
        assert await eventually(serving, 10)
        assert (await running(s, ls))[0]["ttl_remaining"] is None  # busy: the TTL clock is not running
        assert (await busy)[0] == 200
        async with s.post(ls.url + "/api/models/load/nope") as r:
            assert r.status == 404 and (await r.json())["error"]["message"] == "model not found"
