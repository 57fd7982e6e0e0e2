"""Activity: token extraction, speed histograms and the store."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
import zlib

import pytest

import llama_swap as activity
from llama_swap import ActivityStore, QueryError, Tokens, histogram, measure_response

JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}


def measure_json(document, path="/v1/chat/completions", wall_ms=100, headers=JSON):
    return measure_response(path, 200, headers, json.dumps(document).encode(), wall_ms)


def sse(*events) -> bytes:
    lines = []
    for event in events:
        lines.append("data: " + (event if isinstance(event, str) else json.dumps(event)))
        lines.append("")
    return "\n".join(lines).encode()


def parsed(**fields) -> Tokens:
    """A read response's tokens: -1 where the upstream said nothing."""
    defaults = dict(cache_tokens=-1, draft_tokens=-1, draft_acc_tokens=-1, input_tokens=0,
                    output_tokens=0, prompt_per_second=-1.0, tokens_per_second=-1.0)
    return Tokens(**{**defaults, **fields})


# Token counts and speeds read from answers #######################################

def test_openai_usage_with_cached_prompt_tokens():
    tokens, duration, error = measure_json(
        {"usage": {"prompt_tokens": 12, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 4}}})
    assert tokens == parsed(input_tokens=12, output_tokens=7, cache_tokens=4)
    assert (duration, error) == (100, "")


LLAMA_TIMINGS = {"prompt_n": 20, "predicted_n": 50, "prompt_per_second": 100.0, "predicted_per_second": 40.0,
                 "prompt_ms": 200, "predicted_ms": 1250, "cache_n": 8}


def test_llama_server_timings_give_counts_speeds_and_a_longer_duration():
    tokens, duration, _ = measure_json({"timings": LLAMA_TIMINGS}, wall_ms=100)
    assert tokens == parsed(input_tokens=20, output_tokens=50, cache_tokens=8,
                            prompt_per_second=100.0, tokens_per_second=40.0)
    assert duration == 1450


def test_llama_server_timings_never_shorten_the_wall_time():
    _, duration, _ = measure_json({"timings": LLAMA_TIMINGS}, wall_ms=2000)
    assert duration == 2000


def test_llama_server_timings_beat_usage_counts():
    tokens, _, _ = measure_json({"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "timings": LLAMA_TIMINGS})
    assert (tokens.input_tokens, tokens.output_tokens) == (20, 50)


def test_stream_takes_usage_from_the_final_chunk():
    body = sse({"choices": [{}]}, {"usage": {"prompt_tokens": 15, "completion_tokens": 33}}, "[DONE]")
    tokens, duration, error = measure_response("/v1/chat/completions", 200, SSE, body, 70)
    assert tokens == parsed(input_tokens=15, output_tokens=33)
    assert (duration, error) == (70, "")


def test_vllm_stream_metrics_give_speeds():
    body = sse({"choices": [{"delta": {"content": "hi"}}], "usage": None},
               {"choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": 152},
                "metrics": {"time_to_first_token_ms": 70, "mean_itl_ms": 10}},
               "[DONE]")
    tokens, _, _ = measure_response("/v1/chat/completions", 200, SSE, body, 100)
    assert (tokens.input_tokens, tokens.output_tokens, tokens.cache_tokens) == (14, 152, -1)
    assert tokens.prompt_per_second == pytest.approx(200)
    assert tokens.tokens_per_second == pytest.approx(100)
    assert (tokens.draft_tokens, tokens.draft_acc_tokens) == (-1, -1)


def test_vllm_prompt_speed_leaves_cached_tokens_out():
    tokens, _, _ = measure_json({"usage": {"prompt_tokens": 42, "completion_tokens": 128,
                                           "prompt_tokens_details": {"cached_tokens": 20}},
                                 "metrics": {"time_to_first_token_ms": 85.2, "mean_itl_ms": 9.1}})
    assert tokens.cache_tokens == 20
    assert tokens.prompt_per_second == 22 / (85.2 / 1000)
    assert tokens.tokens_per_second == 1000 / 9.1


def test_vllm_speculative_decoding_needs_both_counts():
    tokens, _, _ = measure_json({"usage": {"prompt_tokens": 5, "completion_tokens": 6},
                                 "metrics": {"speculative_decoding": {"num_draft_tokens": 20}}})
    assert (tokens.draft_tokens, tokens.draft_acc_tokens) == (-1, -1)


def test_llama_server_drafts_survive_an_empty_speculative_decoding():
    timings = {**LLAMA_TIMINGS, "draft_n": 30, "draft_n_accepted": 12}
    tokens, _, _ = measure_json({"timings": timings, "metrics": {"speculative_decoding": {}}})
    assert (tokens.draft_tokens, tokens.draft_acc_tokens) == (30, 12)


def test_vllm_speculative_decoding_overrides_draft_counts():
    timings = {**LLAMA_TIMINGS, "draft_n": 30, "draft_n_accepted": 12}
    tokens, _, _ = measure_json({"timings": timings, "metrics": {
        "speculative_decoding": {"num_draft_tokens": 40, "num_accepted_draft_tokens": 25}}})
    assert (tokens.draft_tokens, tokens.draft_acc_tokens) == (40, 25)


def test_infill_reads_timings_from_the_last_element():
    body = [{"content": "a"}, {"content": "b", "timings": {"prompt_n": 5, "predicted_n": 9, "prompt_per_second": 50.5,
                                                             "predicted_per_second": 12.25, "prompt_ms": 10,
                                                             "predicted_ms": 20}}]
    tokens, _, _ = measure_json(body, path="/infill")
    assert tokens == parsed(input_tokens=5, output_tokens=9, prompt_per_second=50.5, tokens_per_second=12.25)


def test_stream_with_only_done_is_a_zero_token_row():
    tokens, duration, error = measure_response("/v1/chat/completions", 200, SSE, sse("[DONE]"), 42)
    assert tokens == Tokens(0, 0, 0, 0, 0, 0.0, 0.0)
    assert (duration, error) == (42, "")


# Other dialects and bodies ###################################################

def test_anthropic_stream_keeps_input_from_message_start_and_output_from_message_delta():
    body = (b"event: message_start\r\n"
            b'data: {"type":"message_start","message":{"id":"msg_1","usage":'
            b'{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}}}\r\n\r\n'
            b"event: content_block_delta\r\n"
            b'data: {"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}\r\n\r\n'
            b"event: message_delta\r\n"
            b'data: {"type":"message_delta","usage":{"input_tokens":0,"output_tokens":15}}\r\n\r\n'
            b"event: message_stop\r\n"
            b'data: {"type":"message_stop"}\r\n\r\n')
    tokens, _, _ = measure_response("/v1/messages", 200, {"content-type": "text/event-stream; charset=utf-8"},
                                    body, 10)
    assert tokens == parsed(input_tokens=25, output_tokens=15, cache_tokens=5)


def test_stream_cache_count_of_zero_is_known_not_unknown():
    body = sse({"usage": {"prompt_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 0}}},
               {"usage": {"prompt_tokens": 0, "completion_tokens": 0}}, "[DONE]")
    tokens, _, _ = measure_response("/v1/chat/completions", 200, SSE, body, 10)
    assert tokens == parsed(input_tokens=4, output_tokens=2, cache_tokens=0)


def test_responses_api_stream_reads_usage_of_response_completed():
    body = sse({"type": "response.created", "response": {"id": "resp_1", "usage": None}},
               {"type": "response.output_text.delta", "delta": "Hi"},
               {"type": "response.completed", "response": {"id": "resp_1", "usage": {
                   "input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
                   "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 42}}})
    tokens, _, _ = measure_response("/v1/responses", 200, SSE, body, 10)
    assert tokens == parsed(input_tokens=30, output_tokens=12, cache_tokens=10)


def test_responses_api_json_uses_input_and_output_tokens():
    tokens, _, _ = measure_json({"object": "response", "usage": {"input_tokens": 8, "output_tokens": 3}},
                                path="/v1/responses")
    assert tokens == parsed(input_tokens=8, output_tokens=3)


def test_first_present_name_wins_even_when_it_is_zero():
    tokens, _, _ = measure_json({"usage": {"prompt_tokens": 0, "input_tokens": 9, "completion_tokens": 1}})
    assert tokens.input_tokens == 0


def test_gzip_body_is_decompressed_for_reading():
    body = gzip.compress(json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode())
    tokens, _, error = measure_response("/v1/chat/completions", 200,
                                        {**JSON, "Content-Encoding": "gzip"}, body, 10)
    assert tokens == parsed(input_tokens=3, output_tokens=4)
    assert error == ""


def test_deflate_body_is_decompressed_for_reading():
    body = zlib.compress(json.dumps({"usage": {"prompt_tokens": 6, "completion_tokens": 1}}).encode())
    tokens, _, _ = measure_response("/v1/chat/completions", 200, {**JSON, "content-encoding": "deflate"}, body, 10)
    assert (tokens.input_tokens, tokens.output_tokens) == (6, 1)


def test_undecompressable_body_is_a_zero_row_with_an_error():
    tokens, duration, error = measure_response("/v1/chat/completions", 200,
                                               {**JSON, "Content-Encoding": "gzip"}, b"not gzip", 10)
    assert tokens == Tokens()
    assert duration == 10
    assert error.startswith("response decompression failed: ")


def test_unknown_encoding_is_read_as_is():
    body = json.dumps({"usage": {"prompt_tokens": 2, "completion_tokens": 2}}).encode()
    tokens, _, _ = measure_response("/v1/chat/completions", 200, {**JSON, "Content-Encoding": "br"}, body, 10)
    assert tokens.input_tokens == 2


def test_empty_200_body_is_a_zero_row():
    assert measure_response("/v1/chat/completions", 200, JSON, b"", 12) == (Tokens(), 12, "")


def test_invalid_json_is_a_zero_row():
    assert measure_response("/v1/chat/completions", 200, JSON, b"{oops", 12) == (Tokens(), 12, "")


def test_json_without_usage_is_a_zero_row():
    assert measure_json({"choices": []}, wall_ms=5) == (Tokens(), 5, "")


# Failed requests #############################################################

def failed(status, body, headers=JSON):
    return measure_response("/v1/chat/completions", status, headers, body, 9)


def test_error_message_from_openai_error_object():
    body = json.dumps({"error": {"message": "context too long", "type": "invalid_request_error"}}).encode()
    assert failed(400, body) == (Tokens(), 9, "context too long")


def test_error_message_from_error_string():
    assert failed(500, b'{"error":"model crashed"}')[2] == "model crashed"


def test_error_message_from_message_when_error_is_empty():
    assert failed(503, b'{"error":"","message":"loading"}')[2] == "loading"


def test_error_message_from_detail():
    assert failed(422, b'{"detail":"field required"}')[2] == "field required"


def test_long_error_message_is_cut_at_500_characters():
    body = json.dumps({"error": {"message": "x" * 600}}).encode()
    assert failed(400, body)[2] == "x" * 500 + "..."


def test_error_without_body_is_the_status_line():
    assert failed(502, b"") == (Tokens(), 9, "502 Bad Gateway")


def test_error_with_a_plain_text_body_is_the_status_line():
    assert failed(404, b"not found")[2] == "404 Not Found"


def test_error_uses_go_reason_phrases():
    assert failed(418, b"")[2] == "418 I'm a teapot"
    assert failed(422, b"")[2] == "422 Unprocessable Entity"


def test_error_with_an_unknown_code():
    assert failed(599, b"")[2] == "HTTP 599"


def test_compressed_error_body_is_read():
    body = gzip.compress(b'{"error":{"message":"bad"}}')
    assert failed(400, body, {**JSON, "Content-Encoding": "gzip"})[2] == "bad"


def test_undecodable_error_body():
    error = failed(500, b"garbage", {**JSON, "Content-Encoding": "gzip"})[2]
    assert error.startswith("response decode failed: ")


# Histograms ##################################################################

def test_histogram_of_nothing_is_none():
    assert histogram([]) is None


def test_histogram_of_one_distinct_value():
    assert histogram([42.5, 42.5, 42.5]) == {"bins": [3], "min": 42.5, "max": 42.5, "binSize": 0,
                                             "p50": 42.5, "p95": 42.5, "p99": 42.5}


def test_histogram_of_the_spec_example():
    assert histogram([30.0, 10.0, 20.0]) == {"bins": [1, 0, 1, 0, 1], "min": 10, "max": 30, "binSize": 4,
                                             "p50": 20, "p95": 29, "p99": 29.8}


def test_histogram_bin_count_grows_with_log2_of_n():
    # n = 40: ceil(log2 40) + 1 = 7 bins of (70 - 0) / 7 = 10; 70 lands in the last bin.
    values = [float(v) for v in range(39)] + [70.0]
    result = histogram(values)
    assert result["binSize"] == 10
    assert result["bins"] == [10, 10, 10, 9, 0, 0, 1]
    # ranks: p50 -> 19.5 between 19 and 20; p95 -> 37.05 between 37 and 38; p99 -> 38.61 between 38 and 70
    assert result["p50"] == pytest.approx(19.5)
    assert result["p95"] == pytest.approx(37.05)
    assert result["p99"] == pytest.approx(38 + 32 * 0.61)


def test_histogram_bin_count_is_at_most_20():
    # 2**19 + 1 values: ceil(log2 n) + 1 = 21, capped.
    result = histogram([float(v) for v in range(2**19 + 1)])
    assert len(result["bins"]) == 20
    assert sum(result["bins"]) == 2**19 + 1


# Store #######################################################################

def add(store, model="m1", ts=1_700_000_000, tokens=None, **fields):
    row = dict(model=model, req_path="/v1/chat/completions", resp_content_type="application/json",
               resp_status_code=200, tokens=tokens or parsed(input_tokens=1, output_tokens=1), duration_ms=10,
               ts_created=ts)
    row.update(fields)
    return store.add(**row)


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def store():
    store = ActivityStore(None, 1000)
    yield store
    store.close()


def test_row_renders_as_the_api_shows_it(store, utc):
    row_id = add(store, ts=1_779_184_801, tokens=parsed(input_tokens=25, output_tokens=10,
                                                         prompt_per_second=0.0, tokens_per_second=10.0),
                 duration_ms=30, error_msg="oops", metadata={"fifo_priority": "0", "selector": "public"})
    assert row_id == 1
    assert json.dumps(store.row(1, lambda i: i == 1)) == json.dumps(
        {"id": 1, "timestamp": "2026-05-19T10:00:01Z", "model": "m1", "req_path": "/v1/chat/completions",
         "resp_content_type": "application/json", "resp_status_code": 200,
         "tokens": {"cache_tokens": -1, "draft_tokens": -1, "draft_acc_tokens": -1, "input_tokens": 25,
                    "output_tokens": 10, "prompt_per_second": 0, "tokens_per_second": 10},
         "duration_ms": 30, "has_capture": True, "error_msg": "oops",
         "metadata": {"fifo_priority": "0", "selector": "public"}})


def test_row_omits_empty_error_and_metadata(store):
    add(store)
    row = store.row(1)
    assert "error_msg" not in row and "metadata" not in row
    assert row["has_capture"] is False
    assert store.row(2) is None


def test_timestamp_uses_the_local_zone(monkeypatch, store):
    monkeypatch.setenv("TZ", "Etc/GMT-2")  # POSIX sign: two hours east of UTC
    time.tzset()
    try:
        add(store, ts=1_779_177_601)
        assert store.row(1)["timestamp"] == "2026-05-19T10:00:01+02:00"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_memory_store_keeps_only_the_newest_rows():
    store = ActivityStore(None, 3)
    ids = [add(store) for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    result = store.query({})
    assert [row["id"] for row in result["data"]] == [5, 4, 3]
    assert result["total"] == 3


def test_file_store_survives_reopening_and_is_never_pruned(tmp_path):
    path = str(tmp_path / "activity.db")
    store = ActivityStore(path, 2)
    for _ in range(4):
        add(store)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    store.close()
    reopened = ActivityStore(path, 2)
    assert add(reopened) == 5
    assert reopened.query({})["total"] == 5
    reopened.close()


def test_a_batch_is_one_transaction_pruned_once_and_a_bad_row_in_it_loses_no_other(tmp_path):
    """The activity worker writes each batch of answers in one transaction (one commit, one
    sync of the file): rows of a batch are all there after it, the in-memory store keeps its
    newest rows, and a row that fails midway leaves the rest of the batch in."""
    memory = ActivityStore(None, 3)
    with memory.batch():
        ids = [add(memory) for _ in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert [row["id"] for row in memory.query({})["data"]] == [5, 4, 3]

    path = str(tmp_path / "activity.db")
    store = ActivityStore(path, 2)
    commits = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    with store.batch():
        add(store, model="first")
        with pytest.raises(AttributeError):
            add(store, tokens="not tokens")
        add(store, model="last", key="k")
    assert len(commits) == 1
    with pytest.raises(RuntimeError), store.batch():
        add(store, model="rolled back")
        raise RuntimeError("the worker failed")
    store.close()
    reopened = ActivityStore(path, 2)
    assert [row["model"] for row in reopened.query({})["data"]] == ["last", "first"]
    reopened.close()


@pytest.mark.parametrize("params, message", [
    ({"start": ["yesterday"]}, "invalid 'start' timestamp, use RFC3339 format"),
    ({"start": ["2026-05-19T10:00:00"]}, "invalid 'start' timestamp, use RFC3339 format"),
    ({"end": ["2026-13-01T00:00:00Z"]}, "invalid 'end' timestamp, use RFC3339 format"),
    ({"start": ["2026-05-19T10:00:01Z"], "end": ["2026-05-19T10:00:00Z"]}, "start must be before end"),
    ({"min_id": ["0"]}, "min_id must be >= 1"),
    ({"min_id": ["x"]}, "min_id must be >= 1"),
    ({"max_id": ["-3"]}, "max_id must be >= 1"),
    ({"min_id": ["5"], "max_id": ["4"]}, "min_id must be <= max_id"),
    ({"limit": ["ten"]}, "invalid limit"),
    ({"limit": ["0"]}, "limit must be between 1 and 999"),
    ({"limit": ["1000"]}, "limit must be between 1 and 999"),
    ({"page": ["0"]}, "page must be >= 1"),
    ({"page": ["two"]}, "page must be >= 1"),
    ({"sort": ["tokens"]}, "invalid sort column"),
    ({"order": ["up"]}, "order must be asc or desc"),
])
def test_query_validation_messages(store, params, message):
    with pytest.raises(QueryError) as raised:
        store.query(params)
    assert str(raised.value) == message


def test_query_accepts_a_multidict():
    class MultiDict:
        def __init__(self, pairs):
            self.pairs = pairs

        def getall(self, name, default):
            return [v for k, v in self.pairs if k == name] or default

    query = activity.ActivityQuery.parse(MultiDict([("model", "a"), ("model", "b"), ("order", "ASC")]))
    assert query.models == ("a", "b")
    assert query.descending is False


def test_pagination(store):
    for _ in range(7):
        add(store)
    result = store.query({"limit": ["3"], "page": ["3"]})
    assert [row["id"] for row in result["data"]] == [1]
    assert (result["page"], result["limit"], result["total"], result["total_pages"]) == (3, 3, 7, 3)
    assert store.query({"limit": ["3"], "page": ["9"]})["data"] == []


def test_empty_store_has_no_pages(store):
    assert store.query({}) == {"data": [], "page": 1, "limit": 25, "total": 0, "total_pages": 0}


def test_sort_by_a_column_then_by_id(store):
    for prompt in (5, 9, 5, 1):
        add(store, tokens=parsed(input_tokens=prompt))
    ascending = store.query({"sort": ["prompt"], "order": ["asc"]})["data"]
    assert [(row["tokens"]["input_tokens"], row["id"]) for row in ascending] == [(1, 4), (5, 1), (5, 3), (9, 2)]
    descending = store.query({"sort": ["prompt"], "order": ["DESC"]})["data"]
    assert [row["id"] for row in descending] == [2, 3, 1, 4]


def test_sort_by_time_and_speed(store):
    add(store, ts=300, tokens=parsed(tokens_per_second=2.0))
    add(store, ts=100, tokens=parsed(tokens_per_second=30.0))
    add(store, ts=200, tokens=parsed(tokens_per_second=10.0))
    assert [r["id"] for r in store.query({"sort": ["time"], "order": ["asc"]})["data"]] == [2, 3, 1]
    assert [r["id"] for r in store.query({"sort": ["gen_speed"]})["data"]] == [2, 3, 1]


def test_repeated_model_filter_is_ored(store):
    for model in ("a", "b", "c", "a"):
        add(store, model=model)
    result = store.query({"model": ["a", "c"]})
    assert [row["id"] for row in result["data"]] == [4, 3, 1]
    assert result["total"] == 3


def test_time_filter_is_inclusive_at_second_resolution(store, utc):
    for ts in (1_779_184_799, 1_779_184_800, 1_779_184_801, 1_779_184_802):
        add(store, ts=ts)
    result = store.query({"start": ["2026-05-19T10:00:00.900Z"], "end": ["2026-05-19T12:00:01+02:00"]})
    assert [row["id"] for row in result["data"]] == [3, 2]


def test_id_range_filter(store):
    for _ in range(6):
        add(store)
    assert [r["id"] for r in store.query({"min_id": ["2"], "max_id": ["4"]})["data"]] == [4, 3, 2]


def test_stats_totals_and_histograms(store):
    add(store, model="a", tokens=parsed(input_tokens=1, output_tokens=2, cache_tokens=1,
                                        prompt_per_second=10.0, tokens_per_second=-1.0))
    add(store, model="a", tokens=parsed(input_tokens=3, output_tokens=4, cache_tokens=-1,
                                        prompt_per_second=30.0))
    add(store, model="a", tokens=Tokens())
    add(store, model="b", tokens=parsed(input_tokens=100, output_tokens=100, cache_tokens=50,
                                        prompt_per_second=20.0, tokens_per_second=5.0))
    assert store.stats("a") == {
        "total_requests": 3, "total_input_tokens": 4, "total_output_tokens": 6, "total_cache_tokens": 1,
        "prompt_histogram": {"bins": [1, 0, 0, 0, 1], "min": 10, "max": 30, "binSize": 4,
                             "p50": 20, "p95": 29, "p99": 29.8},
        "gen_histogram": None}
    everything = store.stats()
    assert (everything["total_requests"], everything["total_cache_tokens"]) == (4, 51)
    assert everything["prompt_histogram"]["bins"] == [1, 0, 1, 0, 1]
    assert everything["gen_histogram"]["bins"] == [1]


def test_stats_of_an_empty_store(store):
    assert store.stats() == {"total_requests": 0, "total_input_tokens": 0, "total_output_tokens": 0,
                             "total_cache_tokens": 0, "prompt_histogram": None, "gen_histogram": None}


# The store as the Go original (v0.x, goose migration 00001) creates it, byte for byte.
ORIGINAL_SCHEMA = """
CREATE TABLE goose_db_version (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		version_id INTEGER NOT NULL,
		is_applied INTEGER NOT NULL,
		tstamp TIMESTAMP DEFAULT (datetime('now'))
	);
INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, 1), (1, 1);
CREATE TABLE activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_created INTEGER NOT NULL,
    model_id TEXT NOT NULL,
    req_path TEXT NOT NULL DEFAULT '',
    resp_content_type TEXT NOT NULL DEFAULT '',
    resp_status_code INTEGER NOT NULL DEFAULT 0,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    draft_tokens INTEGER NOT NULL DEFAULT 0,
    draft_acc_tokens INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    prompt_per_second REAL NOT NULL DEFAULT 0,
    tokens_per_second REAL NOT NULL DEFAULT 0,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT NOT NULL DEFAULT '',
    metadata_json TEXT NOT NULL DEFAULT ''
);
CREATE INDEX idx_activity_created_id
    ON activity (ts_created DESC, id DESC);
CREATE INDEX idx_activity_model_created_id
    ON activity (model_id, ts_created DESC, id DESC);
INSERT INTO activity (ts_created, model_id, req_path, resp_content_type, resp_status_code, input_tokens,
                      output_tokens, duration_ms, metadata_json)
    VALUES (1796532665, 'm', '/v1/chat/completions', 'application/json', 200, 7, 3, 1257, '{"fifo_priority":"0"}');
"""


def original_store(path) -> str:
    import sqlite3

    db = sqlite3.connect(path)
    db.executescript(ORIGINAL_SCHEMA)
    db.close()
    return str(path)


def test_a_store_the_original_created_takes_our_rows_without_metadata_or_error(tmp_path):
    path = original_store(tmp_path / "activity.db")
    store = ActivityStore(path, 1000)
    try:
        add(store, model="up", metadata=None, error_msg="")  # an /upstream or peer request
        add(store, model="bad", error_msg="500 Internal Server Error")
        rows = store.query({})["data"]
        assert [(r["id"], r["model"]) for r in rows] == [(3, "bad"), (2, "up"), (1, "m")]
        assert rows[2]["metadata"] == {"fifo_priority": "0"} and "metadata" not in rows[1]
    finally:
        store.close()


def test_a_store_we_create_is_one_the_original_opens_as_its_own(tmp_path):
    import sqlite3

    path = str(tmp_path / "ours.db")
    ActivityStore(path, 1000).close()
    expected = sqlite3.connect(":memory:")
    expected.executescript(ORIGINAL_SCHEMA.split("INSERT INTO activity")[0])
    db = sqlite3.connect(path)

    def tables(connection) -> dict:
        return {name: sql for name, sql in connection.execute("SELECT name, sql FROM sqlite_master")
                if name in ("activity", "goose_db_version", "idx_activity_created_id", "idx_activity_model_created_id")}

    assert tables(db) == tables(expected)  # so the original's migration finds itself applied and skips
    assert [row for row in db.execute("SELECT version_id, is_applied FROM goose_db_version")] == [(0, 1), (1, 1)]


def test_an_older_store_of_ours_is_mended_for_the_original(tmp_path):
    import sqlite3

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE activity (id INTEGER PRIMARY KEY AUTOINCREMENT, ts_created INTEGER NOT NULL,"
               " model_id TEXT NOT NULL, req_path TEXT NOT NULL, resp_content_type TEXT NOT NULL,"
               " resp_status_code INTEGER NOT NULL, cache_tokens INTEGER NOT NULL, draft_tokens INTEGER NOT NULL,"
               " draft_acc_tokens INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,"
               " prompt_per_second REAL NOT NULL, tokens_per_second REAL NOT NULL, duration_ms INTEGER NOT NULL,"
               " error_msg TEXT, metadata_json TEXT)")  # what llama-swap-py 0.1 created
    db.execute("INSERT INTO activity VALUES (1, 1, 'm', '/v1/x', 'a', 200, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL)")
    db.commit()
    db.close()
    ActivityStore(path, 1000).close()
    db = sqlite3.connect(path)
    assert list(db.execute("SELECT error_msg, metadata_json FROM activity")) == [("", "")]  # Go cannot read NULL text
    assert list(db.execute("SELECT version_id FROM goose_db_version")) == [(0,), (1,)]


async def test_requests_of_every_kind_are_recorded_in_a_store_the_original_created(tmp_path, start_llama_swap,
                                                                                   upstreams):
    import aiohttp

    from helpers import chat

    path = original_store(tmp_path / "activity.db")
    far = start_llama_swap({"healthCheckTimeout": 15, "models": {"far": {"cmd": upstreams.cmd(name="far")}}})
    ls = start_llama_swap({"healthCheckTimeout": 15, "store": {"path": path},
                           "models": {"m": {"cmd": upstreams.cmd(name="m")}},
                           "peers": {"p": {"proxy": far.url, "models": ["far"]}}})
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "m"))[0] == 200
        async with s.post(ls.url + "/upstream/m/v1/chat/completions", json={"model": "m", "messages": []}) as r:
            assert r.status == 200
        assert (await chat(s, ls, "far"))[0] == 200

        async def rows() -> list:
            async with s.get(ls.url + "/api/metrics/activity") as r:
                return (await r.json())["data"]
        for _ in range(100):
            if len(found := await rows()) == 4:
                break
            await asyncio.sleep(0.05)
    assert sorted((row["model"], row["req_path"], row["resp_status_code"]) for row in found) == [
        ("far", "/v1/chat/completions", 200), ("m", "/v1/chat/completions", 200),
        ("m", "/v1/chat/completions", 200), ("m", "/v1/chat/completions", 200)], found
    assert "NOT NULL constraint failed" not in ls.output()


def test_a_batch_that_fails_is_reported_whole_and_leaves_no_capture_under_an_id_used_again(tmp_path):
    """A batch of rows is written whole or not at all. When it fails, SQLite hands its ids out
    again, so none of its captures may stay: the next request's row would show its bodies."""
    config = activity.Config(models={}, store_path=str(tmp_path / "activity.db"))
    recorder = activity.Activity(config, activity.ProxyLog(stdout=None), lambda *row: None)

    def answer(model: str, said: bytes):
        exchange = activity.Exchange("1", model, "/v1/chat/completions", "POST", {}, "127.0.0.1", {}, None,
                                     lambda *a: None, b'{"model": "%s"}' % model.encode())
        return exchange, 200, {"Content-Type": "application/json"}, said, 5

    try:
        first = recorder._record_all([answer("m", b'{"n": 1}'), answer("m", b'{"n": 2}')])
        assert [row[0] for row in first] == [1, 2]
        recorder.store._db.execute("CREATE TRIGGER boom BEFORE INSERT ON activity WHEN NEW.model_id = 'boom'"
                                   " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        failed = recorder._record_all([answer("m", b'{"n": 3}'), answer("boom", b'{"n": 4}')])
        assert len(failed) == 2 and all(isinstance(row, activity.sqlite3.Error) and str(row) == "refused"
                                        for row in failed), failed
        assert not recorder.has_capture(3)
        [(row_id, *_)] = recorder._record_all([answer("m", b'{"n": 5}')])
        assert row_id == 3  # the id the failed batch had taken
        assert recorder.captures.get(3)["resp_body"] == activity.base64.b64encode(b'{"n": 5}').decode()
        assert recorder.store.query({})["total"] == 3
    finally:
        recorder.store.close()
        recorder.worker.shutdown()


def test_captures_keep_bodies_as_they_are_and_show_them_in_base64_when_read(tmp_path):
    """Small captures are kept as they came, big ones compressed; either way a read gives the
    bodies byte for byte, a gzip answer decompressed, and nothing of what was not kept."""
    config = activity.Config(models={}, capture_buffer_mb=1)
    recorder = activity.Activity(config, activity.ProxyLog(stdout=None), lambda *row: None)
    big = json.dumps({"messages": [{"role": "user", "content": "tell me more " * 2000}]}).encode()
    answered = b'{"choices": [{"message": {"content": "\xc3\xa9t\xc3\xa9\\n"}}]}'

    def answer(path: str, sent: bytes, status: int, headers: dict, body: bytes):
        exchange = activity.Exchange("1", "m", path, "POST", {"Authorization": "[REDACTED]"}, "127.0.0.1", {}, None,
                                     lambda *a: None, sent)
        return exchange, status, headers, body, 5

    b64 = lambda data: activity.base64.b64encode(data).decode()  # noqa: E731
    try:
        ids = [row[0] for row in recorder._record_all([
            answer("/v1/chat/completions", b'{"model": "m"}', 200, JSON, answered),
            answer("/v1/chat/completions", big, 200, {**JSON, "Content-Encoding": "gzip"}, gzip.compress(big)),
            answer("/v1/chat/completions", b'{"model": "m", "n": 2}', 500, JSON, b'{"error": "no"}'),
            answer("/v1/audio/transcriptions", b"RIFF....WAVE", 200, JSON, b'{"text": "hi"}'),
        ])]
        small, compressed, failed, audio = (recorder.captures.get(i) for i in ids)
        assert small == {"id": ids[0], "req_path": "/v1/chat/completions",
                         "req_headers": {"Authorization": "[REDACTED]"}, "req_body": b64(b'{"model": "m"}'),
                         "resp_headers": {"Content-Type": "application/json"}, "resp_body": b64(answered)}
        assert compressed["req_body"] == compressed["resp_body"] == b64(big)
        assert compressed["resp_headers"] == {"Content-Type": "application/json"}  # no Content-Encoding: decoded
        assert recorder.captures.size < len(big)  # the two copies of `big` take less than one
        assert (failed["req_body"], failed["resp_body"]) == (b64(b'{"model": "m", "n": 2}'), None)
        assert (audio["req_body"], audio["resp_body"]) == (None, b64(b'{"text": "hi"}'))
    finally:
        recorder.worker.shutdown()


def test_captures_drop_the_oldest_past_their_capacity_and_never_keep_one_bigger_than_it():
    captures = activity.Captures(3000)
    capture = activity.Capture("/v1/x", {}, b"q" * 400, {}, b"a" * 500)
    for capture_id in range(1, 6):
        captures.add(capture_id, capture)
    assert [i for i in range(1, 6) if i in captures] == [3, 4, 5] and captures.size <= 3000
    captures.add(6, activity.Capture("/v1/x", {}, random.randbytes(5000), {}, None))  # does not compress
    assert 6 not in captures and [i for i in range(1, 6) if i in captures] == [3, 4, 5]
