"""Routing: the matrix DSL and its solver, group eviction rules, the fifo scheduler, the
concurrency limit, TTL unloads and startup preloading.

The first half is pure: configs are parsed with `parse_config` and the swap policies are asked
directly. The scheduler is driven with in-memory processes (the FakeProcess pattern of
test_scheduler.py), which pins exact orders that timing hides from outside. The second half runs a
real llama-swap with fake upstreams (llama_swap_responder.py); there, timing assertions are orderings
or loose upper bounds, and lower bounds only where the clock must have passed.

Config DSL *errors* live in test_config_validation.py; this module checks what valid configs mean.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from helpers import chat, eventually, make_scheduler, pid_alive
from llama_swap import (
    READY,
    STARTING,
    STOPPED,
    ConcurrencyLimited,
    Group,
    GroupPolicy,
    MatrixPolicy,
    Scheduler,
    SchedulerError,
    Ticket,
    model_statuses,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_PATH = ROOT / "config.example.yaml"
SRV = "srv --port ${PORT}"

CONCURRENCY_LIMIT_BODY = ('{"src":"llama-swap","error":{"message":"Too many requests","type":"rate_limit_error",'
                          '"param":null,"code":"concurrency_limit"}}')


# =========================================================================== 1. matrix DSL


def matrix_config(sets: dict, variables: dict | None = None, costs: dict | None = None, extra_models=()):
    """A config whose models are every identifier the sets (and vars) name, plus `extra_models`."""
    names = set(extra_models) | set((variables or {}).values())
    for dsl in sets.values():
        names |= {w for w in re.findall(r"(?<![+\w.-])[\w.-]+", dsl)}
    names -= set(variables or {})
    matrix: dict = {}
    if variables:
        matrix["vars"] = variables
    if costs:
        matrix["evict_costs"] = costs
    matrix["sets"] = sets
    doc = {"models": {m: {"cmd": SRV} for m in sorted(names)}, "matrix": matrix}
    return parse_config(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def test_the_model_status_names_each_models_matrix_sets_and_group():
    config = matrix_config({"pair": "a & b"}, extra_models=("c",))
    found = {s["id"]: s.get("matrix_sets") for s in model_statuses(config, dict.fromkeys(config.models, STOPPED))}
    assert found == {"a": ["pair"], "b": ["pair"], "c": []}, "c is in no set: it runs alone"
    grouped = parse_config(yaml.safe_dump({"models": {"a": {"cmd": SRV}, "b": {"cmd": SRV}},
                                           "groups": {"g": {"swap": False, "members": ["a"]}}}))
    found = {s["id"]: s.get("group") for s in model_statuses(grouped, dict.fromkeys(grouped.models, STOPPED))}
    assert found == {"a": {"name": "g", "swap": False, "exclusive": True, "persistent": False}, "b": None}


def distinct(combos) -> list[frozenset]:
    """Combinations in order, a repeated one kept once (the solver keeps the first it finds)."""
    return list(dict.fromkeys(frozenset(c) for c in combos))


def S(*models: str) -> frozenset:
    return frozenset(models)


SPEC_VARS = {"g": "gemma-model", "q": "qwen-model"}
SPEC_COSTS = {"g": 50, "llama-70B": 30}
SPEC_SETS = {"standard": "(g | q) & v", "full": "llama-70B", "with_tts": "+standard & e"}

DSL_CASES = [
    pytest.param(SPEC_SETS, SPEC_VARS, {
        "standard": [S("gemma-model", "v"), S("qwen-model", "v")],
        "full": [S("llama-70B")],
        "with_tts": [S("gemma-model", "v", "e"), S("qwen-model", "v", "e")],
    }, id="spec-example"),
    pytest.param({"s": "a | b & c"}, None, {"s": [S("a"), S("b", "c")]}, id="and-binds-tighter-than-or-right"),
    pytest.param({"s": "a & b | c"}, None, {"s": [S("a", "b"), S("c")]}, id="and-binds-tighter-than-or-left"),
    pytest.param({"s": "a & b | c & d"}, None, {"s": [S("a", "b"), S("c", "d")]}, id="two-and-chains"),
    pytest.param({"s": "(a | b) & c"}, None, {"s": [S("a", "c"), S("b", "c")]}, id="parentheses-group-an-or"),
    pytest.param({"s": "(a | b) & (c | d)"}, None, {"s": [S("a", "c"), S("a", "d"), S("b", "c"), S("b", "d")]},
                 id="cartesian-product-in-order"),
    pytest.param({"s": "a & a & b"}, None, {"s": [S("a", "b")]}, id="duplicate-model-collapses"),
    pytest.param({"s": "(a | b) & (a | b)"}, None, {"s": [S("a"), S("a", "b"), S("b")]},
                 id="duplicate-combination-collapses"),
    pytest.param({"s": "  a&b|c "}, None, {"s": [S("a", "b"), S("c")]}, id="whitespace-is-ignored"),
    pytest.param({"s": "((a))"}, None, {"s": [S("a")]}, id="nested-parentheses"),
    pytest.param({"s": "a"}, None, {"s": [S("a")]}, id="single-model"),
    pytest.param({"s": "my_model.v2-q4 & modèle9"}, None, {"s": [S("my_model.v2-q4", "modèle9")]},
                 id="identifiers-take-letters-digits-underscore-dash-dot"),
    pytest.param({"s": "a | x"}, {"x": "b", "a": "c"}, {"s": [S("c"), S("b")]},
                 id="a-var-wins-over-a-model-id"),  # model a exists too
    pytest.param({"top": "+mid & d", "mid": "+base & c", "base": "a | b"}, None, {
        "base": [S("a"), S("b")],
        "mid": [S("a", "c"), S("b", "c")],
        "top": [S("a", "c", "d"), S("b", "c", "d")],
    }, id="chained-refs-defined-backwards"),
    pytest.param({"x": "+z", "y": "a", "z": "b"}, None, {"z": [S("b")], "x": [S("b")], "y": [S("a")]},
                 id="referenced-set-first-then-definition-order"),
    pytest.param({"s": "a | b", "t": "+s & +s"}, None, {"s": [S("a"), S("b")], "t": [S("a"), S("a", "b"), S("b")]},
                 id="same-ref-twice"),
    pytest.param({"s": "a | b", "t": "c | (+s & d)"}, None,
                 {"s": [S("a"), S("b")], "t": [S("c"), S("a", "d"), S("b", "d")]},
                 id="ref-inside-parentheses"),
]


@pytest.mark.parametrize("sets, variables, expected", DSL_CASES)
def test_matrix_sets_expand_to_the_model_sets_they_allow_in_solver_order(sets, variables, expected):
    # every var key is also a model ID here, so a var that resolved as a model would show
    matrix = matrix_config(sets, variables, extra_models=list(variables or {})).routing.matrix
    assert list(matrix.combinations) == list(expected), "sets must be in topological, then definition, order"
    assert {name: distinct(combos) for name, combos in matrix.combinations.items()} == expected
    assert matrix.sets == sets


def test_matrix_vars_and_costs_resolve_to_model_ids():
    config = matrix_config(SPEC_SETS, SPEC_VARS, SPEC_COSTS)
    assert config.routing.router == "matrix"
    assert config.routing.matrix.evict_costs == {"gemma-model": 50, "llama-70B": 30}
    assert config.routing.matrix.vars == SPEC_VARS


def test_matrix_under_routing_router_means_the_same_as_the_legacy_key():
    legacy = matrix_config(SPEC_SETS, SPEC_VARS, SPEC_COSTS)
    doc = {"models": {m: {"cmd": SRV} for m in legacy.models},
           "routing": {"router": {"use": "matrix", "settings": {"matrix": {
               "vars": SPEC_VARS, "evict_costs": SPEC_COSTS, "sets": SPEC_SETS}}}}}
    new = parse_config(yaml.safe_dump(doc, sort_keys=False))
    assert new.routing.router == "matrix"
    assert new.routing.matrix.combinations == legacy.routing.matrix.combinations
    assert new.routing.matrix.evict_costs == legacy.routing.matrix.evict_costs


# -- the documented matrix in config.example.yaml ---------------------------------------------

BEGIN = re.compile(r"^# --- (?P<label>.+): begin ---$")


def documented_block(label: str) -> str:
    """The commented YAML between '# --- <label>: begin ---' and its end marker, uncommented
    ('# key: v' -> 'key: v', '## note' -> '# note'), as tests/test_config_schema.py reads it."""
    lines = EXAMPLE_PATH.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if (m := BEGIN.match(line)) and m["label"] == label)
    end = lines.index(f"# --- {label}: end ---", start)
    body = [line[2:] if line.startswith("# ") else line[1:] for line in lines[start + 1:end]]
    return "\n".join(body) + "\n"


def test_documented_legacy_matrix_expands_and_solves_as_documented():
    config = parse_config(documented_block("legacy matrix"))
    assert config.routing.router == "matrix"
    matrix = config.routing.matrix
    assert matrix.vars == {"q": "qwen-8b", "g": "gemma"}
    assert matrix.evict_costs == {"gemma": 5}
    assert {k: distinct(v) for k, v in matrix.combinations.items()} == {"chat": [S("qwen-8b"), S("gemma")]}
    policy = MatrixPolicy(matrix)
    assert policy.evictions("gemma", {"qwen-8b"}) == {"qwen-8b"}  # "q | g": either, never both
    assert policy.evictions("qwen-8b", {"gemma"}) == {"gemma"}
    assert policy.evictions("qwen-8b", {"qwen-8b"}) == set()
    assert policy.explain("gemma", {"qwen-8b"}) == ('matrix: model=gemma set=chat dsl="q | g" evict=[qwen-8b] '
                                                    'target=[gemma] cost=1')
    assert policy.explain("qwen-8b", {"gemma"}) == ('matrix: model=qwen-8b set=chat dsl="q | g" evict=[gemma] '
                                                    'target=[qwen-8b] cost=5')


def test_documented_routing_matrix_expands_and_solves_as_documented():
    """The matrix of the "all keys" reference block (routing.router.settings.matrix), read with
    `use: matrix` instead of the block's `use: group`."""
    doc = yaml.safe_load(documented_block("all keys"))
    settings = doc["routing"]["router"]["settings"]
    assert doc["routing"]["router"]["use"] == "group"
    text = yaml.safe_dump({
        "models": {m: {"cmd": SRV} for m in ("qwen-8b", "gemma", "whisper", "embed-gpu0", "embed-gpu1")},
        "routing": {"router": {"use": "matrix", "settings": {"matrix": settings["matrix"]}}},
    }, sort_keys=False)
    matrix = parse_config(text).routing.matrix
    assert list(matrix.combinations) == ["chat", "chat_and_speech", "embeddings"]
    assert {k: distinct(v) for k, v in matrix.combinations.items()} == {
        "chat": [S("qwen-8b"), S("gemma")],
        "chat_and_speech": [S("qwen-8b", "whisper"), S("gemma", "whisper")],
        "embeddings": [S("embed-gpu0", "embed-gpu1")],
    }
    policy = MatrixPolicy(matrix)
    assert policy.evictions("whisper", {"gemma"}) == set()  # +chat & w: speech joins the chat model
    assert policy.evictions("whisper", {"gemma", "embed-gpu0"}) == {"embed-gpu0"}
    assert policy.evictions("embed-gpu1", {"embed-gpu0", "whisper", "gemma"}) == {"whisper", "gemma"}
    # qwen alone costs gemma (5) + whisper (1); qwen with whisper costs only gemma: the later set wins.
    assert policy.evictions("qwen-8b", {"gemma", "whisper"}) == {"gemma"}
    assert policy.explain("qwen-8b", {"gemma", "whisper"}) == (
        'matrix: model=qwen-8b set=chat_and_speech dsl="+chat & w" evict=[gemma] target=[qwen-8b whisper] cost=5')


# =========================================================================== 1b. matrix solver


@pytest.fixture(scope="module")
def spec_policy() -> MatrixPolicy:
    return MatrixPolicy(matrix_config(SPEC_SETS, SPEC_VARS, SPEC_COSTS, extra_models=["solo"]).routing.matrix)


SOLVER_CASES = [  # (target, running, evicted)
    pytest.param("v", set(), set(), id="nothing-running"),
    pytest.param("e", {"gemma-model", "v"}, set(), id="joins-a-running-subset-at-no-cost"),
    pytest.param("v", {"qwen-model"}, set(), id="subset-semantics-partner-already-there"),
    pytest.param("llama-70B", {"gemma-model", "v"}, {"gemma-model", "v"}, id="full-evicts-all"),
    pytest.param("qwen-model", {"gemma-model", "v"}, {"gemma-model"}, id="keeps-the-shared-partner"),
    pytest.param("gemma-model", {"qwen-model", "v", "e"}, {"qwen-model"}, id="keeps-tts-partners"),
    pytest.param("v", {"llama-70B", "e"}, {"llama-70B"}, id="least-cost-beats-definition-order"),
    pytest.param("gemma-model", {"llama-70B"}, {"llama-70B"}, id="costly-model-evicted-when-no-set-keeps-it"),
    pytest.param("e", {"llama-70B", "qwen-model"}, {"llama-70B"}, id="cost-30-evicted-rather-than-kept-apart"),
    pytest.param("gemma-model", {"gemma-model", "llama-70B", "qwen-model"}, set(), id="target-running-evicts-nothing"),
    pytest.param("solo", {"gemma-model", "v", "e"}, {"gemma-model", "v", "e"}, id="model-in-no-set-runs-alone"),
    pytest.param("solo", set(), set(), id="model-in-no-set-nothing-running"),
    pytest.param("v", {"solo"}, {"solo"}, id="model-in-no-set-is-evicted-by-any-set"),
]


@pytest.mark.parametrize("target, running, evicted", SOLVER_CASES)
def test_matrix_solver_evicts_the_cheapest_way_to_an_allowed_set(spec_policy, target, running, evicted):
    assert spec_policy.evictions(target, running) == evicted
    # whatever it chose, what is left plus the target is allowed together (or the target runs alone)
    left = (set(running) - evicted) | {target}
    if target != "solo" and target not in running:
        assert any(left <= combo for combos in spec_policy.matrix.combinations.values() for combo in combos), left


def test_matrix_solver_reports_set_models_and_cost(spec_policy):
    assert spec_policy.choose("llama-70B", frozenset({"gemma-model", "v"})) == ("full", S("llama-70B"), 51)
    assert spec_policy.choose("v", frozenset({"llama-70B", "e"})) == ("with_tts", S("gemma-model", "v", "e"), 30)
    assert spec_policy.choose("solo", frozenset({"v"})) is None


@pytest.mark.parametrize("sets, evicted", [
    pytest.param({"s1": "a & b", "s2": "a & c"}, {"c"}, id="first-set-wins"),
    pytest.param({"s2": "a & c", "s1": "a & b"}, {"b"}, id="first-defined-not-first-by-name"),
    pytest.param({"s": "(b | c) & a"}, {"c"}, id="first-alternative-wins"),
    pytest.param({"s": "(c | b) & a"}, {"b"}, id="first-alternative-wins-reversed"),
    pytest.param({"late": "a & b | +early", "early": "a & c"}, {"b"}, id="referenced-set-is-considered-first"),
])
def test_matrix_solver_breaks_cost_ties_by_definition_order(sets, evicted):
    policy = MatrixPolicy(matrix_config(sets).routing.matrix)
    assert policy.evictions("a", {"b", "c"}) == evicted


def test_matrix_default_evict_cost_is_one_per_model():
    policy = MatrixPolicy(matrix_config({"pair": "a & b", "lone": "a"}, costs={"b": 3}).routing.matrix)
    assert policy.choose("a", frozenset({"b", "c", "d"})) == ("pair", S("a", "b"), 2)  # c and d: 1 each
    policy = MatrixPolicy(matrix_config({"pair": "a & b", "trio": "a & c & d"}, costs={"b": 3}).routing.matrix)
    assert policy.choose("a", frozenset({"b", "c", "d"})) == ("pair", S("a", "b"), 2)  # 1 + 1 < 3
    assert policy.evictions("a", {"b", "c", "d"}) == {"c", "d"}


def test_matrix_explain_lines(spec_policy):
    assert spec_policy.explain("v", set()) == "matrix: model=v starting (no models running)"
    assert spec_policy.explain("v", {"v"}) == "matrix: model=v starting (no models running)"  # the target itself
    assert spec_policy.explain("llama-70B", {"gemma-model", "v"}) == (
        'matrix: model=llama-70B set=full dsl="llama-70B" evict=[gemma-model v] target=[llama-70B] cost=51')
    assert spec_policy.explain("qwen-model", {"gemma-model", "v"}) == (
        'matrix: model=qwen-model set=standard dsl="(g | q) & v" evict=[gemma-model] target=[qwen-model v] cost=50')
    assert spec_policy.explain("v", {"llama-70B", "e"}) == (
        'matrix: model=v set=with_tts dsl="+standard & e" evict=[llama-70B] target=[e gemma-model v] cost=30')


# =========================================================================== 2. groups


def flags(swap: bool, exclusive: bool, persistent: bool) -> dict:
    return {"swap": swap, "exclusive": exclusive, "persistent": persistent}


BOOLS = (True, False)


@pytest.mark.parametrize("g_swap, g_exclusive, g_persistent", list(itertools.product(BOOLS, BOOLS, BOOLS)))
@pytest.mark.parametrize("h_swap, h_exclusive, h_persistent", list(itertools.product(BOOLS, BOOLS, BOOLS)))
def test_group_eviction_for_every_flag_combination(g_swap, g_exclusive, g_persistent, h_swap, h_exclusive,
                                                   h_persistent):
    """The group eviction rule: a same-group member goes iff the target's group swaps; another group's member
    goes iff the target's group is exclusive and the other group is not persistent. Nothing else
    (the other group's swap/exclusive, the target group's persistent) matters."""
    policy = GroupPolicy([
        Group("G", S("t", "t2"), **flags(g_swap, g_exclusive, g_persistent)),
        Group("H", S("h1", "h2"), **flags(h_swap, h_exclusive, h_persistent)),
    ])
    expected = set()
    if g_swap:
        expected.add("t2")
    if g_exclusive and not h_persistent:
        expected |= {"h1", "h2"}
    assert policy.evictions("t", {"t2", "h1", "h2"}) == expected
    assert policy.evictions("t", {"t", "t2", "h1", "h2"}) == expected  # the target itself is never evicted
    assert policy.evictions("t", set()) == set()


GROUP_TABLE = [  # (target group flags, other group flags, same-group member evicted, other group evicted)
    pytest.param(flags(True, True, False), flags(True, True, False), True, True, id="defaults-both"),
    pytest.param(flags(False, True, False), flags(True, True, False), False, True, id="no-swap-exclusive"),
    pytest.param(flags(True, False, False), flags(True, True, False), True, False,
                 id="non-exclusive-spares-an-exclusive-group"),
    pytest.param(flags(False, False, False), flags(True, True, False), False, False, id="no-swap-non-exclusive"),
    pytest.param(flags(True, True, False), flags(True, True, True), True, False, id="exclusive-vs-persistent"),
    pytest.param(flags(True, False, False), flags(True, True, True), True, False, id="non-exclusive-vs-persistent"),
    pytest.param(flags(True, True, True), flags(True, True, False), True, True,
                 id="persistent-target-group-still-swaps-and-evicts"),
    pytest.param(flags(True, True, False), flags(False, False, False), True, True, id="others-flags-do-not-protect-it"),
]


@pytest.mark.parametrize("target_flags, other_flags, same_goes, other_goes", GROUP_TABLE)
def test_group_eviction_table(target_flags, other_flags, same_goes, other_goes):
    policy = GroupPolicy([Group("G", S("t", "t2"), **target_flags), Group("H", S("h"), **other_flags)])
    evicted = policy.evictions("t", {"t2", "h"})
    assert ("t2" in evicted) is same_goes
    assert ("h" in evicted) is other_goes


def group_config(groups: dict | None, models=("a", "b", "c", "d", "e")):
    doc: dict = {"models": {m: {"cmd": SRV} for m in models}}
    if groups is not None:
        doc["groups"] = groups
    return parse_config(yaml.safe_dump(doc, sort_keys=False))


def test_without_groups_every_model_is_in_the_default_group_one_at_a_time():
    config = group_config(None)
    (default,) = config.routing.groups
    assert default == Group("(default)", S("a", "b", "c", "d", "e"), swap=True, exclusive=True, persistent=False)
    policy = GroupPolicy(config.routing.groups)
    assert policy.evictions("a", {"b", "c", "d", "e"}) == {"b", "c", "d", "e"}
    assert policy.evictions("a", {"a"}) == set()


def test_default_group_holds_the_ungrouped_models_and_is_exclusive():
    config = group_config({
        "side": {"swap": False, "exclusive": False, "members": ["a", "b"]},
        "pinned": {"persistent": True, "exclusive": False, "members": ["c"]},
    })
    groups = {g.name: g for g in config.routing.groups}
    assert groups["(default)"] == Group("(default)", S("d", "e"), swap=True, exclusive=True, persistent=False)
    assert groups["side"] == Group("side", S("a", "b"), swap=False, exclusive=False, persistent=False)
    assert groups["pinned"] == Group("pinned", S("c"), swap=True, exclusive=False, persistent=True)
    policy = GroupPolicy(config.routing.groups)
    assert policy.evictions("d", {"e", "a", "b", "c"}) == {"e", "a", "b"}  # swap in default; exclusive; c persistent
    assert policy.evictions("a", {"b", "d", "c"}) == set()  # non-exclusive, no swap
    assert policy.evictions("c", {"a", "d"}) == set()  # persistent is not exclusive here


def test_groups_under_routing_router_settings_read_like_legacy_groups():
    groups = {"g": {"swap": False, "members": ["a", "b"]}}
    legacy = group_config(groups)
    doc = {"models": {m: {"cmd": SRV} for m in "abcde"},
           "routing": {"router": {"use": "group", "settings": {"groups": groups}}}}
    new = parse_config(yaml.safe_dump(doc, sort_keys=False))
    assert sorted(new.routing.groups, key=lambda g: g.name) == sorted(legacy.routing.groups, key=lambda g: g.name)


# =========================================================================== 3. scheduler


async def settle(rounds: int = 5) -> None:
    """Let every runnable task run up to its next real wait."""
    for _ in range(rounds):
        await asyncio.sleep(0.005)


async def serve(scheduler: Scheduler, model: str, served: list[str], hold: float = 0.02) -> None:
    async with scheduler.lease(model):
        served.append(model)
        await asyncio.sleep(hold)


async def hold_until(scheduler: Scheduler, model: str, release: asyncio.Event, log: list[str]) -> None:
    """A request for `model` that is served until `release` is set; marks its start and end in `log`."""
    async with scheduler.lease(model):
        log.append(f"serving {model}")
        await release.wait()
        log.append(f"done {model}")


async def refused(scheduler: Scheduler, model: str) -> bool:
    """Whether a request is refused at once for the concurrency limit (False: it was admitted)."""
    async def attempt():
        async with scheduler.lease(model):
            pass

    task = asyncio.create_task(attempt())
    await settle(2)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    error = task.exception()
    if isinstance(error, ConcurrencyLimited):
        assert str(error) == "Too many requests"
        return True
    return False


async def test_queued_requests_are_served_by_priority_then_arrival():
    scheduler, processes, events = make_scheduler("x", "a", "b", "c", "d", priority={"a": 0, "b": 5, "c": 5, "d": 1})
    release_x = asyncio.Event()
    served: list[str] = []
    x = asyncio.create_task(hold_until(scheduler, "x", release_x, served))
    await settle()
    assert served == ["serving x"]
    waiting = []
    for model in "abcd":  # arrival order a(0) b(5) c(5) d(1), all needing x stopped
        waiting.append(asyncio.create_task(serve(scheduler, model, served)))
        await settle(1)
    await settle()
    assert [t.model for t in scheduler.queue] == ["b", "c", "d", "a"]
    assert [scheduler.position(t) for t in scheduler.queue] == [1, 2, 3, 4]
    assert [t.priority for t in scheduler.queue] == [5, 5, 1, 0]
    assert events == ["start x"], "x is serving: nothing may be stopped or started for the queue"

    processes["b"].start_gate.clear()
    release_x.set()
    await x
    await settle()
    assert events == ["start x", "stop x", "start b"]
    assert [t.model for t in scheduler.queue] == ["c", "d", "a"]
    assert [scheduler.position(t) for t in scheduler.queue] == [1, 2, 3]
    processes["b"].start_gate.set()

    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert served == ["serving x", "done x", "b", "c", "d", "a"]
    assert events == ["start x", "stop x", "start b", "stop b", "start c", "stop c", "start d", "stop d", "start a"]
    assert scheduler.queue == [] and not scheduler.swaps
    assert all(n == 0 for n in scheduler.reserved.values()) and all(n == 0 for n in scheduler.in_flight.values())


async def test_position_is_zero_for_a_request_that_is_not_queued():
    scheduler, _, _ = make_scheduler("a")
    assert scheduler.position(Ticket("a")) == 0


async def test_a_later_higher_priority_request_overtakes_the_queue_but_not_the_model_serving():
    scheduler, _, events = make_scheduler("x", "low", "high", priority={"high": 9})
    release_x = asyncio.Event()
    served: list[str] = []
    x = asyncio.create_task(hold_until(scheduler, "x", release_x, served))
    await settle()
    low = asyncio.create_task(serve(scheduler, "low", served))
    await settle()
    high = asyncio.create_task(serve(scheduler, "high", served))
    await settle()
    assert [scheduler.position(t) for t in scheduler.queue] == [1, 2]
    assert [t.model for t in scheduler.queue] == ["high", "low"]
    # a new request for the model that is serving still goes straight through
    await asyncio.wait_for(serve(scheduler, "x", served), 5)
    assert served == ["serving x", "x"]
    release_x.set()
    await asyncio.wait_for(asyncio.gather(x, low, high), 10)
    assert served == ["serving x", "x", "done x", "high", "low"]
    assert events == ["start x", "stop x", "start high", "stop high", "start low"]


async def test_swaps_with_disjoint_evictions_start_in_parallel():
    policy = GroupPolicy([
        Group("g1", S("a1", "a2"), swap=False, exclusive=False),
        Group("g2", S("b1", "b2"), swap=False, exclusive=False),
    ])
    scheduler, processes, events = make_scheduler("a1", "a2", "b1", "b2", policy=policy)
    for p in processes.values():
        p.start_gate.clear()
    served: list[str] = []
    tasks = [asyncio.create_task(serve(scheduler, m, served)) for m in ("a1", "b1", "a2", "b2")]
    await settle()
    # all four are starting at once: nothing has to stop for any of them
    assert sorted(events) == ["start a1", "start a2", "start b1", "start b2"]
    assert {m: p.state for m, p in processes.items()} == dict.fromkeys(processes, STARTING)
    assert set(scheduler.swaps) == {"a1", "a2", "b1", "b2"}
    for p in processes.values():
        p.start_gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sorted(served) == ["a1", "a2", "b1", "b2"]
    assert not any(e.startswith("stop") for e in events)


async def test_two_non_exclusive_swap_groups_swap_in_parallel():
    """Each group swaps its own member; the two swaps touch different models and overlap."""
    policy = GroupPolicy([
        Group("g1", S("a", "b"), swap=True, exclusive=False),
        Group("g2", S("c", "d"), swap=True, exclusive=False),
    ])
    scheduler, processes, events = make_scheduler("a", "b", "c", "d", policy=policy)
    await asyncio.gather(serve(scheduler, "a", []), serve(scheduler, "c", []))
    assert processes["a"].state == READY and processes["c"].state == READY
    processes["b"].start_gate.clear()
    processes["d"].start_gate.clear()
    events.clear()
    tasks = [asyncio.create_task(serve(scheduler, m, [])) for m in ("b", "d")]
    await settle()
    assert processes["b"].state == STARTING and processes["d"].state == STARTING
    assert sorted(events) == ["start b", "start d", "stop a", "stop c"]
    processes["b"].start_gate.set()
    processes["d"].start_gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert {m for m, p in processes.items() if p.state == READY} == {"b", "d"}


async def test_a_swap_that_would_evict_another_swaps_target_waits_for_it():
    scheduler, processes, events = make_scheduler("a", "b", "c")
    await serve(scheduler, "a", [])
    processes["b"].start_gate.clear()
    served: list[str] = []
    b = asyncio.create_task(serve(scheduler, "b", served))
    await settle()
    c = asyncio.create_task(serve(scheduler, "c", served))
    await settle()
    assert events == ["start a", "stop a", "start b"]
    assert [t.model for t in scheduler.queue] == ["c"]
    processes["b"].start_gate.set()
    await asyncio.wait_for(asyncio.gather(b, c), 10)
    assert served == ["b", "c"]
    assert events == ["start a", "stop a", "start b", "stop b", "start c"]


async def test_a_model_that_is_serving_is_never_evicted_while_unrelated_swaps_go_ahead():
    policy = GroupPolicy([
        Group("g1", S("a", "b"), swap=True, exclusive=False),
        Group("g2", S("c"), swap=False, exclusive=False),
    ])
    scheduler, processes, events = make_scheduler("a", "b", "c", policy=policy)
    release_a = asyncio.Event()
    a = asyncio.create_task(hold_until(scheduler, "a", release_a, events))
    await settle()
    b = asyncio.create_task(serve(scheduler, "b", events))
    await settle()
    assert [t.model for t in scheduler.queue] == ["b"], "b needs a stopped, and a is serving"
    await asyncio.wait_for(serve(scheduler, "c", events), 5)  # disjoint: not held up by b's wait
    assert processes["a"].state == READY and processes["c"].state == READY and processes["b"].state == STOPPED
    release_a.set()
    await asyncio.wait_for(asyncio.gather(a, b), 10)
    assert events == ["start a", "serving a", "start c", "c", "done a", "stop a", "start b", "b"]
    assert processes["c"].state == READY


async def test_concurrency_limit_refuses_the_request_over_the_limit_and_releases_every_reservation():
    scheduler, processes, _ = make_scheduler("a", limit=3)
    processes["a"].start_gate.clear()
    served: list[str] = []
    waiters = [asyncio.create_task(serve(scheduler, "a", served)) for _ in range(3)]
    await settle()
    assert scheduler.reserved["a"] == 3
    assert await refused(scheduler, "a"), "a fourth request was admitted"
    assert scheduler.reserved["a"] == 3, "a refused request must not take a reservation"
    processes["a"].start_gate.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert served == ["a"] * 3
    assert scheduler.reserved["a"] == 0 and scheduler.in_flight["a"] == 0


async def test_concurrency_limit_counts_requests_being_served():
    scheduler, _, _ = make_scheduler("a", limit=3)
    release = asyncio.Event()
    log: list[str] = []
    holders = [asyncio.create_task(hold_until(scheduler, "a", release, log)) for _ in range(3)]
    await settle()
    assert log == ["serving a"] * 3 and scheduler.in_flight["a"] == 3
    assert await refused(scheduler, "a")
    release.set()
    await asyncio.gather(*holders)
    assert scheduler.reserved["a"] == 0
    await serve(scheduler, "a", log)  # room again
    assert scheduler.reserved["a"] == 0


async def test_concurrency_limit_is_per_model():
    scheduler, processes, _ = make_scheduler("a", "b", limit=1)
    release = asyncio.Event()
    holder = asyncio.create_task(hold_until(scheduler, "a", release, []))
    await settle()
    assert await refused(scheduler, "a")
    b = asyncio.create_task(serve(scheduler, "b", []))  # admitted (it queues behind a)
    await settle()
    assert scheduler.reserved["b"] == 1 and not b.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, b), 10)
    assert scheduler.reserved["a"] == 0 and scheduler.reserved["b"] == 0


async def test_cancelled_requests_give_their_reservation_back():
    scheduler, processes, _ = make_scheduler("x", "a", limit=3)
    processes["a"].start_gate.clear()
    waiters = [asyncio.create_task(serve(scheduler, "a", [])) for _ in range(3)]
    await settle()
    waiters[0].cancel()
    waiters[1].cancel()
    await asyncio.gather(*waiters[:2], return_exceptions=True)
    assert scheduler.reserved["a"] == 1
    more = [asyncio.create_task(serve(scheduler, "a", [])) for _ in range(2)]
    await settle()
    assert scheduler.reserved["a"] == 3
    assert await refused(scheduler, "a")
    # a request queued behind a busy model, then cancelled, also gives its place back
    release = asyncio.Event()
    processes["a"].start_gate.set()
    await asyncio.wait_for(asyncio.gather(waiters[2], *more), 10)
    holder = asyncio.create_task(hold_until(scheduler, "a", release, []))
    await settle()
    queued = asyncio.create_task(serve(scheduler, "x", []))
    await settle()
    assert scheduler.reserved["x"] == 1 and [t.model for t in scheduler.queue] == ["x"]
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert scheduler.reserved["x"] == 0 and scheduler.queue == []
    release.set()
    await holder
    assert scheduler.reserved["a"] == 0 and scheduler.in_flight["a"] == 0


async def test_failed_start_gives_every_reservation_back():
    scheduler, processes, events = make_scheduler("a", limit=3)
    processes["a"].fail_next_start = "upstream command exited prematurely with exit status 1"
    processes["a"].start_gate.clear()
    waiters = [asyncio.create_task(serve(scheduler, "a", [])) for _ in range(3)]
    await settle()
    assert await refused(scheduler, "a")
    processes["a"].start_gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 10)
    assert all(isinstance(r, SchedulerError) and not isinstance(r, ConcurrencyLimited) for r in results), results
    assert scheduler.reserved["a"] == 0 and scheduler.in_flight["a"] == 0
    served: list[str] = []
    await asyncio.gather(*(serve(scheduler, "a", served) for _ in range(3)))
    assert served == ["a"] * 3 and events == ["start a", "start a"]
    assert scheduler.reserved["a"] == 0


# =========================================================================== 4. end to end

HEALTH_TIMEOUT = 15
START_BOUND = 20.0  # seconds a cold responder may take to become ready on a slow machine
# A request's reservation is given back when its handler returns, a moment after the client has
# read the last byte; tests that count reservations across requests wait this long in between.
RELEASE_GRACE = 0.3


def config(models: dict[str, dict], **top) -> dict:
    return {"healthCheckTimeout": HEALTH_TIMEOUT, **top, "models": models}


async def running_models(session: aiohttp.ClientSession, ls) -> dict[str, str]:
    async with session.get(ls.url + "/running") as r:
        assert r.status == 200
        return {e["model"]: e["state"] for e in (await r.json())["running"]}


async def pid_of(session: aiohttp.ClientSession, ls, model: str) -> int:
    async with session.get(f"{ls.url}/upstream/{model}/_responder/info") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["pid"]


def sse_data(raw: bytes) -> list[str]:
    return [line[len("data: "):] for line in raw.decode().splitlines() if line.startswith("data: ")]


# -- 429 -----------------------------------------------------------------------------------------


def assert_rate_limited(status: int, headers, body: bytes) -> None:
    assert status == 429, body
    assert body.decode() == CONCURRENCY_LIMIT_BODY
    assert headers.get("Retry-After") == "1"
    assert headers.get("Content-Type", "").split(";")[0].strip() == "application/json"


async def test_request_over_the_concurrency_limit_gets_429_at_once(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a"), "concurrencyLimit": 2}}))
    finished: list[int] = []

    async def slow(s):
        async with s.post(ls.url + "/v1/chat/completions", json={"model": "a", "responder_sleep": 1.0}) as r:
            body = await r.read()
            finished.append(r.status)
            return r.status, r.headers, body

    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200  # warm: admission, not the start, is under test
        await asyncio.sleep(RELEASE_GRACE)
        results = await asyncio.wait_for(asyncio.gather(*(slow(s) for _ in range(3))), START_BOUND)
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 429], statuses
        assert finished[0] == 429, f"the refused request must be answered before the admitted ones finish: {finished}"
        assert_rate_limited(*next(r for r in results if r[0] == 429))
        # every reservation is back: two more at once are both admitted
        await asyncio.sleep(RELEASE_GRACE)
        results = await asyncio.wait_for(asyncio.gather(*(slow(s) for _ in range(2))), START_BOUND)
        assert [status for status, _, _ in results] == [200, 200]


async def test_streaming_request_over_the_limit_gets_429_before_any_stream_bytes(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a"), "concurrencyLimit": 2,
                                        "sendLoadingState": True}}))
    stream = {"model": "a", "stream": True, "responder_chunks": 10, "responder_delay": 0.2}
    async with aiohttp.ClientSession() as s:
        async with s.post(ls.url + "/v1/chat/completions", json=stream) as first, \
                s.post(ls.url + "/v1/chat/completions", json=stream) as second:
            assert first.status == 200 and second.status == 200
            await first.content.readline()  # both are being served now
            await second.content.readline()
            async with s.post(ls.url + "/v1/chat/completions", json=stream) as third:
                body = await third.read()
                assert_rate_limited(third.status, third.headers, body)
                assert "text/event-stream" not in third.headers.get("Content-Type", "")
            rest = sse_data(await first.read()) + sse_data(await second.read())
        assert rest.count("[DONE]") == 2, "the admitted streams must complete"
        await asyncio.sleep(RELEASE_GRACE)
        status, body = await chat(s, ls, "a", stream=False)
        assert status == 200, body


async def test_default_concurrency_limit_is_ten(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}}))
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "a"))[0] == 200
        await asyncio.sleep(RELEASE_GRACE)

        async def slow():
            async with s.post(ls.url + "/v1/chat/completions", json={"model": "a", "responder_sleep": 1.5}) as r:
                return r.status, r.headers, await r.read()

        results = await asyncio.wait_for(asyncio.gather(*(slow() for _ in range(11))), START_BOUND)
    assert sorted(r[0] for r in results) == [200] * 10 + [429]
    assert_rate_limited(*next(r for r in results if r[0] == 429))


# -- TTL -----------------------------------------------------------------------------------------


async def test_ttl_unloads_an_idle_model_a_few_seconds_after_its_last_request(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a"), "ttl": 2, "unloadTimeout": 1}}))
    async with aiohttp.ClientSession() as s:
        status, _ = await chat(s, ls, "a")
        assert status == 200
        last_request_ended = time.monotonic()
        (pid,) = upstreams.pids()
        await asyncio.sleep(1.0)
        if time.monotonic() - last_request_ended < 1.8:  # (a stalled machine may have slept longer)
            assert await running_models(s, ls) == {"a": "ready"}, "unloaded before its ttl ran out"
        assert await eventually(lambda: _empty(s, ls), 10, 0.1)
        unloaded_after = time.monotonic() - last_request_ended
    assert 1.8 <= unloaded_after <= 10, unloaded_after
    assert "Unloading model, TTL of 2s reached" in ls.output()
    assert re.search(r"<a> Unloading model, TTL of 2s reached", ls.output())
    assert await eventually(lambda: not pid_alive(pid), 5)


async def _empty(s, ls) -> bool:
    return await running_models(s, ls) == {}


async def test_a_stream_longer_than_the_ttl_keeps_the_model_loaded_until_it_ends(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a"), "ttl": 1, "unloadTimeout": 1}}))
    async with aiohttp.ClientSession() as s:
        body = {"model": "a", "stream": True, "responder_chunks": 12, "responder_delay": 0.3}  # ~3.6 s
        began = time.monotonic()
        async with s.post(ls.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            events = sse_data(await r.read())
        ended = time.monotonic()
        output_at_end = ls.output()
        assert ended - began >= 3.0
        assert events[-1] == "[DONE]" and len(events) == 14, events
        assert "Unloading model" not in output_at_end, "the model was unloaded while streaming"
        assert await running_models(s, ls) == {"a": "ready"}
        assert await eventually(lambda: _empty(s, ls), 10, 0.1)
    assert "Unloading model, TTL of 1s reached" in ls.output()
    assert len(upstreams.pids()) == 1


async def test_a_request_during_a_ttl_unload_restarts_the_model(start_llama_swap, upstreams):
    # The upstream takes 2 s to exit after SIGTERM (brief asked 1.5 s; a little more margin on a slow
    # machine so that the request below surely lands while the old server is still stopping).
    ls = start_llama_swap(config({"a": {"cmd": upstreams.cmd("--sigterm-delay", "2.0", name="a"), "ttl": 1}}))
    async with aiohttp.ClientSession() as s:
        status, _ = await chat(s, ls, "a")
        assert status == 200
        (old_pid,) = upstreams.pids()
        assert await asyncio.to_thread(ls.wait_for, "Unloading model, TTL of 1s reached", 15)
        old_alive_when_asked = pid_alive(old_pid)
        status, body = await asyncio.wait_for(chat(s, ls, "a"), 30)
        assert status == 200, body
        assert body["model"] == "a"
        pids = upstreams.pids()
        assert len(pids) == 2 and pids[0] == old_pid, pids
        assert not pid_alive(old_pid), "the stopping server must be gone before the new one serves"
        assert pid_alive(pids[1])
        assert await pid_of(s, ls, "a") == pids[1]
    assert old_alive_when_asked, "the request was meant to arrive while the TTL stop was still running"


# -- preload -------------------------------------------------------------------------------------


async def test_preload_loads_the_model_at_startup_without_a_request(start_llama_swap, upstreams):
    ls = start_llama_swap(config({"a": {"cmd": upstreams.cmd(name="a"), "aliases": ["a-alias"]},
                                  "b": {"cmd": upstreams.cmd(name="b")}},
                                 hooks={"on_startup": {"preload": [" a-alias ", ""]}}))
    assert ls.wait_for("preloading model: a")
    assert await eventually(lambda: len(upstreams.pids()) == 1, START_BOUND)
    async with aiohttp.ClientSession() as s:
        assert await eventually(lambda: _models_are(s, ls, {"a": "ready"}), START_BOUND)
        assert await pid_of(s, ls, "a") == upstreams.pids()[0]
    assert "preloading model: b" not in ls.output()
    assert "failed to preload" not in ls.output()


async def _models_are(s, ls, expected: dict) -> bool:
    return await running_models(s, ls) == expected


async def test_preload_and_requests_at_startup_share_one_start(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd("--startup-delay", "0.5", name="a"),
                                        "concurrencyLimit": 20}},
                                 hooks={"on_startup": {"preload": ["a"]}}))
    async with aiohttp.ClientSession() as s:
        results = await asyncio.wait_for(asyncio.gather(*(chat(s, ls, "a") for _ in range(10))), 2 * START_BOUND)
    assert [status for status, _ in results] == [200] * 10, results
    assert [body["model"] for _, body in results] == ["a"] * 10
    assert len(upstreams.pids()) == 1, f"preload and requests must share one start: {upstreams.pids()}"
    assert "preloading model: a" in ls.output()


async def test_preloading_two_members_of_a_swap_group_leaves_the_last_loaded(in_process, upstreams):
    ls = await in_process(config({"a": {"cmd": upstreams.cmd(name="a")}, "b": {"cmd": upstreams.cmd(name="b")}},
                                 hooks={"on_startup": {"preload": ["a", "b"]}}))
    async with aiohttp.ClientSession() as s:
        assert await eventually(lambda: len(upstreams.pids()) == 2, 2 * START_BOUND)
        assert await eventually(lambda: _models_are(s, ls, {"b": "ready"}), START_BOUND)
    out = ls.output()
    assert out.index("preloading model: a") < out.index("preloading model: b")
    a_pid, b_pid = upstreams.pids()
    assert not pid_alive(a_pid) and pid_alive(b_pid)


# =========================================================================== 5. groups end to end


async def test_groups_keep_models_of_non_exclusive_groups_and_swap_within_a_group(in_process, upstreams):
    ls = await in_process(config({m: {"cmd": upstreams.cmd(name=m)} for m in "abcd"}, groups={
        "g1": {"swap": True, "exclusive": False, "members": ["a", "b"]},
        "g2": {"swap": False, "exclusive": False, "members": ["c", "d"]},
    }))
    async with aiohttp.ClientSession() as s:
        for model in ("c", "d"):
            assert (await chat(s, ls, model))[0] == 200
        assert await running_models(s, ls) == {"c": "ready", "d": "ready"}, "swap: false keeps both members"
        c_pid, d_pid = await pid_of(s, ls, "c"), await pid_of(s, ls, "d")

        assert (await chat(s, ls, "a"))[0] == 200
        assert await running_models(s, ls) == {"a": "ready", "c": "ready", "d": "ready"}
        a_pid = await pid_of(s, ls, "a")

        status, body = await chat(s, ls, "b")
        assert status == 200 and body["model"] == "b"
        assert await running_models(s, ls) == {"b": "ready", "c": "ready", "d": "ready"}
        assert not pid_alive(a_pid), "a and b share a swap group"
        assert (await pid_of(s, ls, "c"), await pid_of(s, ls, "d")) == (c_pid, d_pid)
        assert pid_alive(c_pid) and pid_alive(d_pid)
    assert len(upstreams.pids()) == 4


async def test_a_persistent_group_survives_exclusive_loads(in_process, upstreams):
    ls = await in_process(config({m: {"cmd": upstreams.cmd(name=m)} for m in ("x", "y", "p", "o", "z")}, routing={
        "router": {"use": "group", "settings": {"groups": {
            "big": {"swap": True, "exclusive": True, "members": ["x", "y"]},
            "pinned": {"persistent": True, "exclusive": False, "members": ["p"]},
            "side": {"swap": False, "exclusive": False, "members": ["o"]},
        }}},  # z is in the (default) group: swap and exclusive
    }))
    async with aiohttp.ClientSession() as s:
        for model in ("p", "o"):
            assert (await chat(s, ls, model))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "o": "ready"}
        p_pid = await pid_of(s, ls, "p")

        assert (await chat(s, ls, "x"))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "x": "ready"}, "exclusive x stops o but not persistent p"

        assert (await chat(s, ls, "o"))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "x": "ready",
                                               "o": "ready"}, "non-exclusive o stops nothing"

        assert (await chat(s, ls, "y"))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "y": "ready"}

        assert (await chat(s, ls, "z"))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "z": "ready"}, "the default group is exclusive too"

        assert (await chat(s, ls, "p"))[0] == 200
        assert await running_models(s, ls) == {"p": "ready", "z": "ready"}
        assert await pid_of(s, ls, "p") == p_pid and pid_alive(p_pid), "p was never restarted"
    assert len(upstreams.pids()) == 6  # p, o, x, o again, y, z


async def test_matrix_router_swaps_end_to_end_and_logs_its_decisions(in_process, upstreams):
    ls = await in_process(config({m: {"cmd": upstreams.cmd(name=m)} for m in ("chat1", "chat2", "tts")}, matrix={
        "vars": {"c1": "chat1", "c2": "chat2"},
        "evict_costs": {"c1": 3},
        "sets": {"talk": "(c1 | c2) & tts"},
    }))
    async with aiohttp.ClientSession() as s:
        assert (await chat(s, ls, "chat1"))[0] == 200
        assert (await chat(s, ls, "tts"))[0] == 200
        assert await running_models(s, ls) == {"chat1": "ready", "tts": "ready"}
        assert (await chat(s, ls, "chat2"))[0] == 200
        assert await running_models(s, ls) == {"chat2": "ready", "tts": "ready"}
    out = ls.output()
    assert "matrix: model=chat1 starting (no models running)" in out
    assert 'matrix: model=chat2 set=talk dsl="(c1 | c2) & tts" evict=[chat1] target=[chat2 tts] cost=3' in out
