"""API keys and the adminKeys extension, through a real llama-swap.

`apiKeys` guards the model routes and the admin API; `/health`, `/wol-health`, `/`, the
`/upstream` list and unknown paths stay open. The key is the Basic password, else the Bearer
token, else `x-api-key`.
With `adminKeys` (llama-swap-py extension), the admin surface (/running, unload, reload, ...)
takes only admin keys, while keys from `apiKeys` are for the model routes alone; an admin
key works everywhere.
"""

from __future__ import annotations

import base64
import json

import aiohttp

HEALTH_TIMEOUT = 15
TIMEOUT = aiohttp.ClientTimeout(total=60)

KEY = "sk-test-k1-Zq8vRw"
WRONG = "sk-wrong-Pf3xNm"
USER_KEY = "sk-user-Hb7tYc"
ADMIN_KEY = "sk-admin-Lm2wQd"

UNAUTHORIZED = json.dumps({"src": "llama-swap", "error": {
    "message": "unauthorized: invalid or missing API key", "type": "authentication_error", "param": None,
    "code": "unauthorized"}}, separators=(",", ":"))


# --------------------------------------------------------------------------- helpers


def config(upstreams, **top) -> dict:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": {"a": {"cmd": upstreams.cmd(name="a")}}}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def call(session: aiohttp.ClientSession, ls, method: str, path: str, headers: dict | None = None,
               **kwargs) -> tuple[int, str, object]:
    async with session.request(method, ls.url + path, headers=headers or {}, allow_redirects=False, **kwargs) as r:
        return r.status, await r.text(), r.headers


async def chat(session: aiohttp.ClientSession, ls, headers: dict | None = None) -> tuple[int, str, dict]:
    return await call(session, ls, "POST", "/v1/chat/completions", headers, json={"model": "a"})


# Every guarded route a test walks through: (method, path, kwargs).
MODEL_ROUTES = [
    ("POST", "/v1/chat/completions", {"json": {"model": "a"}}),
    ("GET", "/v1/models", {}),
    ("GET", "/upstream/a/", {}),
]
ADMIN_ROUTES = [
    ("GET", "/running", {}),
    ("POST", "/api/models/unload", {}),
]


def assert_unauthorized(status: int, text: str, headers) -> None:
    assert status == 401, text
    assert text == UNAUTHORIZED
    assert headers.get("WWW-Authenticate") == 'Basic realm="llama-swap"'
    assert headers.get("Content-Type", "").startswith("application/json")


def assert_forbidden(status: int, text: str) -> None:
    assert status == 403, text
    body = json.loads(text)
    assert body["src"] == "llama-swap", body
    assert body["error"]["code"] == "forbidden", body
    assert body["error"]["type"] == "authentication_error", body


def assert_no_key_in_log(ls, *keys: str) -> None:
    output = ls.output()
    for key in keys:
        assert key not in output, f"{key!r} appears in the log:\n{output}"


# --------------------------------------------------------------------------- apiKeys


async def test_missing_or_wrong_keys_get_401_with_a_basic_challenge_and_start_nothing(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for headers in ({}, bearer(WRONG), {"x-api-key": WRONG}, basic("user", WRONG), bearer("")):
            for method, path, kwargs in MODEL_ROUTES + ADMIN_ROUTES + [("POST", "/api/config/reload", {})]:
                status, text, reply_headers = await call(s, ls, method, path, headers, **kwargs)
                assert_unauthorized(status, text, reply_headers)
        assert upstreams.pids() == [], "a request without a valid key must not start a model"
    assert_no_key_in_log(ls, KEY, WRONG)


async def test_bearer_x_api_key_and_basic_password_all_work_on_every_guarded_route(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[KEY, "sk-other-key"]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        forms = [bearer(KEY), {"Authorization": f"bearer {KEY}"}, {"x-api-key": KEY}, basic("anyuser", KEY),
                 basic("", KEY), {"Authorization": "BASIC " + base64.b64encode(f"x:{KEY}".encode()).decode()},
                 bearer("sk-other-key")]
        for headers in forms:
            for method, path, kwargs in MODEL_ROUTES + ADMIN_ROUTES:
                status, text, _ = await call(s, ls, method, path, headers, **kwargs)
                assert status == 200, (headers, method, path, text)
        status, text, _ = await call(s, ls, "POST", "/api/models/unload/a", bearer(KEY))
        assert status == 200, text
    assert_no_key_in_log(ls, KEY, "sk-other-key")


async def test_basic_wins_over_x_api_key_and_a_malformed_basic_falls_back_to_it(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        # A well-formed Authorization header is the key, even when x-api-key holds a good one.
        for authorization in (basic("user", WRONG), bearer(WRONG)):
            status, text, headers = await chat(s, ls, {**authorization, "x-api-key": KEY})
            assert_unauthorized(status, text, headers)
        # Basic that does not decode to user:password is no key at all: x-api-key is read.
        for malformed in ("Basic !!!not-base64!!!", "Basic " + base64.b64encode(b"no-colon").decode()):
            status, text, _ = await chat(s, ls, {"Authorization": malformed, "x-api-key": KEY})
            assert status == 200, (malformed, text)
            status, text, headers = await chat(s, ls, {"Authorization": malformed})
            assert_unauthorized(status, text, headers)
        # No query-parameter keys.
        status, text, headers = await call(s, ls, "GET", f"/v1/models?api_key={KEY}&key={KEY}")
        assert_unauthorized(status, text, headers)


async def test_open_paths_and_unknown_paths_need_no_key(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for path in ("/health", "/wol-health"):
            status, text, _ = await call(s, ls, "GET", path)
            assert (status, text) == (200, "OK"), path
        status, _, headers = await call(s, ls, "GET", "/")
        assert status == 302 and headers["Location"] == "/ui"
        status, _, headers = await call(s, ls, "GET", "/upstream")
        assert status == 302 and headers["Location"] == "/ui/models"
        status, text, _ = await call(s, ls, "GET", "/no/such/path")
        assert (status, text) == (404, "404 page not found\n")
        status, text, _ = await call(s, ls, "GET", "/v1/chat/completions")  # known path, wrong method
        assert status == 405, text
        status, text, headers = await call(s, ls, "OPTIONS", "/v1/chat/completions",
                                           {"Origin": "http://example.com", "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "Valid, Bad Header, X-Ok"})
        assert status == 204, text  # a CORS preflight: answered for any path, without a key
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert headers["Access-Control-Allow-Methods"] == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        assert headers["Access-Control-Allow-Headers"] == "Valid, X-Ok"
        assert headers["Access-Control-Max-Age"] == "86400"
        status, _, headers = await call(s, ls, "OPTIONS", "/anything/at/all")
        assert status == 204
        assert headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization, Accept, X-Requested-With"
        assert upstreams.pids() == []


async def test_the_client_credentials_are_forwarded_upstream_unchanged_and_never_logged(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for headers in (bearer(KEY), basic("someone", KEY), {"x-api-key": KEY}):
            status, text, _ = await chat(s, ls, headers)
            assert status == 200, text
            echoed = {k.lower(): v for k, v in json.loads(text)["echo"]["headers"].items()}
            for name, value in headers.items():
                assert echoed.get(name.lower()) == value, (name, echoed)
        # The /upstream passthrough forwards them too.
        status, text, _ = await call(s, ls, "POST", "/upstream/a/v1/chat/completions", bearer(KEY), json={"x": 1})
        assert status == 200, text
        echoed = {k.lower(): v for k, v in json.loads(text)["echo"]["headers"].items()}
        assert echoed.get("authorization") == f"Bearer {KEY}"
        status, text, headers = await chat(s, ls, bearer(WRONG))
        assert_unauthorized(status, text, headers)
    assert "/v1/chat/completions" in ls.output()  # the access log was written
    assert_no_key_in_log(ls, KEY, WRONG, base64.b64encode(f"someone:{KEY}".encode()).decode())


# --------------------------------------------------------------------------- adminKeys


async def test_with_admin_keys_a_user_key_serves_models_but_gets_403_on_the_admin_api(in_process, upstreams):
    ls = await in_process(config(upstreams, apiKeys=[USER_KEY], adminKeys=[ADMIN_KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for headers in (bearer(USER_KEY), {"x-api-key": USER_KEY}, basic("u", USER_KEY)):
            for method, path, kwargs in MODEL_ROUTES:
                status, text, _ = await call(s, ls, method, path, headers, **kwargs)
                assert status == 200, (headers, path, text)
            for method, path in (("GET", "/running"), ("POST", "/api/models/unload"),
                                 ("POST", "/api/models/unload/a"), ("POST", "/api/config/reload")):
                status, text, _ = await call(s, ls, method, path, headers)
                assert_forbidden(status, text)
        # The refused unloads did nothing: a is still loaded.
        status, text, _ = await call(s, ls, "GET", "/running", bearer(ADMIN_KEY))
        assert status == 200, text
        assert [(e["model"], e["state"]) for e in json.loads(text)["running"]] == [("a", "ready")]

        # The admin key works everywhere, model routes included.
        for headers in (bearer(ADMIN_KEY), {"x-api-key": ADMIN_KEY}, basic("admin", ADMIN_KEY)):
            for method, path, kwargs in MODEL_ROUTES + ADMIN_ROUTES + [("POST", "/api/config/reload", {})]:
                status, text, _ = await call(s, ls, method, path, headers, **kwargs)
                assert status == 200, (headers, path, text)

        # No key, or an unknown one: 401 everywhere.
        for headers in ({}, bearer(WRONG)):
            for method, path, kwargs in MODEL_ROUTES + ADMIN_ROUTES:
                status, text, reply_headers = await call(s, ls, method, path, headers, **kwargs)
                assert_unauthorized(status, text, reply_headers)
    assert_no_key_in_log(ls, USER_KEY, ADMIN_KEY, WRONG)


async def test_with_only_admin_keys_model_routes_are_open_and_the_admin_api_needs_the_admin_key(
        in_process, upstreams):
    ls = await in_process(config(upstreams, adminKeys=[ADMIN_KEY]))
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for headers in ({}, bearer(WRONG)):
            for method, path, kwargs in MODEL_ROUTES:
                status, text, _ = await call(s, ls, method, path, headers, **kwargs)
                assert status == 200, (headers, path, text)
            for method, path in (("GET", "/running"), ("POST", "/api/models/unload"), ("POST", "/api/config/reload")):
                status, text, reply_headers = await call(s, ls, method, path, headers)
                assert_unauthorized(status, text, reply_headers)
        for headers in (bearer(ADMIN_KEY), {"x-api-key": ADMIN_KEY}, basic("admin", ADMIN_KEY)):
            for method, path, kwargs in ADMIN_ROUTES + MODEL_ROUTES:
                status, text, _ = await call(s, ls, method, path, headers, **kwargs)
                assert status == 200, (headers, path, text)
        status, text, _ = await call(s, ls, "GET", "/health")
        assert status == 200
    assert_no_key_in_log(ls, ADMIN_KEY, WRONG)
