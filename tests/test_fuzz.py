"""Property-based fuzzing of one running llama-swap (issue 9 "Bad input refused cleanly").

Hypothesis draws whole requests: a method, a path built from the real route prefixes and random
segments (percent-escapes, dot segments, unicode), Content-Type variants (multipart with random
boundaries among them), a few odd headers, and a body that is random bytes, random JSON, a
JSON object naming the real model (or something like it) with `stream` true or false, or a
multipart form. Every request is framed correctly (http.client builds it) and goes on a
connection of its own. The properties:

* every request gets a response (no reset, no silent close);
* no 500, unless it is a llama-swap envelope about an upstream or model failure. The config
  has a single healthy responder model, so none of those should happen either;
* afterwards the server is alive, answers /health, and its output holds no traceback.

The run is derandomized (the same examples every time) and sized to take well under a minute.
"""

from __future__ import annotations

import http.client
import json
import re
import string
import urllib.parse

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MODEL = "m"
EXAMPLES = 400
ROUTES = [
    "", "/", "/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens",
    "/v1/embeddings", "/v1/responses", "/v1/rerank", "/v1/audio/transcriptions", "/v1/audio/speech",
    "/v1/audio/voices", "/v1/images/edits", "/v1/models", "/v1", "/v/chat/completions", "/props", "/infill",
    "/completion", "/sdapi/v1/txt2img", "/audioapi/v1/tasks/run", f"/upstream/{MODEL}", "/upstream",
    "/comfyui", "/api/models/unload", "/api/models/load", f"/api/models/load/{MODEL}", "/api/profiles",
    "/api/profiles/active", "/api/inflight", "/api/captures", "/api/metrics/activity", "/api/metrics/stats",
    "/api/version", "/api/performance", "/api/hardware", "/api/events", "/running", "/unload", "/health",
    "/wol-health", "/models", "/metrics", "/logs", "/logs/stream", "/ui", "/favicon.ico",
]
# What a path segment may look like: plain characters RFC 3986 allows, dot segments and
# escapes (some of them invalid), and any bytes or unicode text percent-encoded.
SEGMENTS = st.one_of(
    st.text(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@", min_size=1, max_size=8),
    st.sampled_from([".", "..", "%2e", "%2e%2e", ".%2e", "%2f", "..%2f", "%5c", "%00", "%0a", "%0d%0a",
                     "%zz", "%", "%252e", "%c0%ae", MODEL, "v1", "chat", "completions"]),
    st.binary(min_size=1, max_size=4).map(lambda b: "".join(f"%{x:02X}" for x in b)),
    st.text(min_size=1, max_size=4).map(lambda t: urllib.parse.quote(t, safe="")),
)
QUERY_VALUES = st.one_of(st.sampled_from([MODEL, "true", "false", "", "nope"]), SEGMENTS)
QUERIES = st.one_of(
    st.just(""),
    st.lists(st.tuples(st.sampled_from(["model", "stream", "after", "limit", "x"]), QUERY_VALUES),
             min_size=1, max_size=3).map(lambda pairs: "?" + "&".join(f"{k}={v}" for k, v in pairs)),
)
# Half the paths are a route as it is, so that requests get past the router as often as not.
PATHS = st.builds(lambda route, segments, query: (route + "".join("/" + s for s in segments) or "/") + query,
                  st.sampled_from(ROUTES), st.just([]) | st.lists(SEGMENTS, min_size=1, max_size=3), QUERIES)
METHODS = st.just("POST") | st.just("GET") | st.sampled_from(["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND"])

# Bodies. JSON keys are at most 8 characters, so never one of the fake upstream's own controls
# (responder_status: 500 would make it fail on request).
KEYS = st.text(max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
MODEL_NAMES = st.one_of(st.sampled_from([MODEL, "m-alias"]),
                        st.sampled_from([MODEL.upper(), f" {MODEL}", f"{MODEL}/", f"../{MODEL}", "", "nope"]),
                        st.text(max_size=12))
CHAT_OBJECTS = st.builds(
    lambda extra, fields: {**extra, **fields},
    st.dictionaries(KEYS, JSON_VALUES, max_size=3),
    st.fixed_dictionaries({"model": MODEL_NAMES, "stream": st.booleans()},
                          optional={"messages": st.just([{"role": "user", "content": "hi"}])}),
)
BOUNDARIES = st.text(string.ascii_letters + string.digits + "'()+_,-./:=?", min_size=1, max_size=70)
JSON_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "Application/JSON"])
OTHER_TYPES = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "application/octet-stream",
                               "multipart/form-data", "multipart/form-data; boundary=", "garbage/;;=", ""])


def form(boundary: str, model: str, audio: bytes) -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f'Content-Type: audio/wav\r\n\r\n').encode() + audio + f"\r\n--{boundary}--\r\n".encode()


@st.composite
def forms(draw) -> tuple[str, bytes]:
    """A multipart form naming a model; its header's boundary may differ, its end may be cut off."""
    boundary = draw(BOUNDARIES)
    body = form(boundary, draw(MODEL_NAMES), draw(st.binary(max_size=300)))
    body = body[:draw(st.integers(0, len(body)))] if draw(st.booleans()) else body
    header_boundary = draw(st.one_of(st.just(boundary), st.just(f'"{boundary}"'), BOUNDARIES))
    return f"multipart/form-data; boundary={header_boundary}", body


# (Content-Type, body): a third chat requests, a third forms, a third anything else.
BODIES = st.one_of(
    st.tuples(JSON_TYPES, CHAT_OBJECTS.map(lambda o: json.dumps(o).encode())),
    forms(),
    st.one_of(st.tuples(JSON_TYPES, JSON_VALUES.map(lambda v: json.dumps(v).encode())),
              st.tuples(JSON_TYPES | OTHER_TYPES, st.binary(max_size=500)),
              st.tuples(OTHER_TYPES, st.just(b""))),
)
# Header values as the RFC allows them (visible ASCII, obs-text, spaces and tabs).
HEADER_VALUES = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)) | st.just("\t"), max_size=40)
HEADERS = st.dictionaries(
    st.sampled_from(["X-Forwarded-For", "X-Real-IP", "User-Agent", "Origin", "Cookie", "X-Api-Key",
                     "Authorization", "Content-Encoding", "If-None-Match", "X-Anything"]),
    st.one_of(HEADER_VALUES, st.sampled_from(["gzip", "deflate", "br", "identity", "127.0.0.1"])),
    max_size=3,
)
MODEL_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/embeddings", "/v1/responses",
                "/v1/audio/transcriptions", "/v/chat/completions", "/infill", f"/upstream/{MODEL}/v1/chat/completions"]


def request(method: str, target: str, typed_body: tuple[str, bytes], headers: dict[str, str]) -> tuple:
    content_type, body = typed_body
    return method, target, {**headers, "Content-Type": content_type}, body


# Half the requests are model requests (most of the rest never get past the router).
MODEL_TARGETS = st.builds(str.__add__, st.sampled_from(MODEL_ROUTES), QUERIES)
REQUESTS = st.one_of(st.builds(request, st.just("POST"), MODEL_TARGETS, BODIES, HEADERS),
                     st.builds(request, METHODS, PATHS, BODIES, HEADERS))
# What a 500 may be about: an upstream or a model failed (none should here: the one model is healthy).
UPSTREAM_FAILURE = re.compile(r"^(upstream |unspecific error: |peer proxy error|\[.+\] process is not ready)")


def send(port: int, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection: the status, and the body when it is a bounded one
    (or an error's). An open-ended answer (an event or log stream) is cut off once its status is in."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, body=body if method != "HEAD" else None, headers=headers)
        response = conn.getresponse()
        bounded = response.getheader("Content-Length") is not None or response.status >= 500
        return response.status, response.read() if bounded else b""
    except (ConnectionError, http.client.HTTPException) as e:
        raise AssertionError(f"no response to {method} {target}: {e!r}") from None
    finally:
        conn.close()


def assert_no_server_fault(status: int, body: bytes, request: str) -> None:
    """Other 5xx are llama-swap's deliberate answers (503 from /api/performance with the sampler
    off, say); a 500 is a fault, unless it is an envelope about an upstream or model failure."""
    if status != 500:
        return
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{status} for {request}: {body[:500]!r}") from None
    assert UPSTREAM_FAILURE.match(error.get("message", "")), f"{status} for {request}: {body[:500]!r}"


def test_no_request_gets_a_server_fault_and_the_server_survives_them_all(start_llama_swap, upstreams):
    ls = start_llama_swap({"healthCheckTimeout": 15, "performance": {"disabled": True},
                           "models": {MODEL: {"cmd": upstreams.cmd(name=MODEL), "aliases": ["m-alias"]}}})
    statuses = []

    # Shrinking is off: every example costs real requests (and maybe a model start), and the
    # failing request is reported whole anyway.
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow])
    @given(REQUESTS)
    def request_is_answered_without_a_server_fault(drawn):
        method, target, headers, body = drawn
        status, reply = send(ls.port, method, target, headers, body)
        statuses.append(status)
        assert_no_server_fault(status, reply, f"{method} {target} {headers} body {body[:300]!r}")

    request_is_answered_without_a_server_fault()
    print(f"{len(statuses)} requests tried, {statuses.count(200)} answered 200")
    assert len(statuses) >= EXAMPLES // 2, f"only {len(statuses)} examples ran"
    assert upstreams.pids(), "no request ever reached the model: the fuzz only exercised the router"
    assert ls.proc.poll() is None, ls.output()[-3000:]
    assert send(ls.port, "GET", "/health", {}, b"") == (200, b"OK")
    output = ls.output()
    first = output.find("Traceback (most recent call last)")
    assert first == -1, output[max(0, first - 2000):first + 4000]
