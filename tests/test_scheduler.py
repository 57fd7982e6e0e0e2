"""Scheduler decisions and the swap policy, with in-memory processes (no sockets, no children).

The end-to-end tests in test_lifecycle.py check the same rules against real upstreams; these
pin the exact order of starts, stops and grants, which timing makes hard to see from outside.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers import make_scheduler, one_at_a_time
from llama_swap import READY, Group, GroupPolicy, Scheduler, SchedulerError


async def serve(scheduler: Scheduler, model: str, served: list[str], hold: float = 0.02) -> None:
    async with scheduler.lease(model):
        served.append(model)
        await asyncio.sleep(hold)


async def arrive_one_by_one(scheduler: Scheduler, models: str) -> list[str]:
    """Requests for `models`, each arriving once the one before is queued; the order served."""
    served: list[str] = []
    tasks = []
    for model in models:
        tasks.append(asyncio.create_task(serve(scheduler, model, served)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return served


async def test_requests_queued_while_cold_are_collated_by_model():
    scheduler, _, events = make_scheduler("a", "b")
    assert await arrive_one_by_one(scheduler, "abab") == ["a", "a", "b", "b"]
    assert events == ["start a", "stop a", "start b"]


async def test_concurrent_requests_for_a_cold_model_share_one_start():
    scheduler, _, events = make_scheduler("a")
    served: list[str] = []
    await asyncio.gather(*(serve(scheduler, "a", served) for _ in range(20)))
    assert served == ["a"] * 20
    assert events == ["start a"]


async def test_a_swap_never_stops_a_model_that_is_still_serving():
    scheduler, processes, events = make_scheduler("a", "b")
    served: list[str] = []
    long_a = asyncio.create_task(serve(scheduler, "a", served, hold=0.3))
    await asyncio.sleep(0.1)
    b = asyncio.create_task(serve(scheduler, "b", served))
    await asyncio.sleep(0.1)
    assert events == ["start a"] and processes["a"].state == READY
    await asyncio.gather(long_a, b)
    assert served == ["a", "b"]
    assert events == ["start a", "stop a", "start b"]


async def test_requests_for_the_ready_model_go_straight_through_while_others_wait():
    scheduler, _, events = make_scheduler("a", "b")
    served: list[str] = []
    long_a = asyncio.create_task(serve(scheduler, "a", served, hold=0.3))
    await asyncio.sleep(0.1)
    b = asyncio.create_task(serve(scheduler, "b", served))
    await asyncio.sleep(0.05)
    await serve(scheduler, "a", served)
    assert served == ["a", "a"]
    await asyncio.gather(long_a, b)
    assert served == ["a", "a", "b"]


async def test_failed_start_answers_every_waiter_and_the_next_request_tries_again():
    scheduler, processes, events = make_scheduler("a")
    processes["a"].fail_next_start = "upstream command exited prematurely"
    results = await asyncio.gather(*(serve(scheduler, "a", []) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, SchedulerError) and "exited prematurely" in str(r) for r in results)
    served: list[str] = []
    await serve(scheduler, "a", served)
    assert served == ["a"] and events == ["start a", "start a"]


async def test_a_client_that_leaves_the_queue_never_starts_its_model():
    scheduler, _, events = make_scheduler("a", "b")
    served: list[str] = []
    long_a = asyncio.create_task(serve(scheduler, "a", served, hold=0.2))
    await asyncio.sleep(0.05)
    b = asyncio.create_task(serve(scheduler, "b", served))
    await asyncio.sleep(0.05)
    b.cancel()
    await long_a
    await asyncio.sleep(0.05)
    assert events == ["start a"]
    assert scheduler.queue == [] and scheduler.in_flight["a"] == 0


async def test_a_grant_to_a_client_that_already_left_is_given_back():
    scheduler, _, _ = make_scheduler("a")
    waiter = asyncio.create_task(serve(scheduler, "a", []))
    grant = scheduler._grant

    def grant_as_the_client_leaves(ticket):
        grant(ticket)
        waiter.cancel()

    scheduler._grant = grant_as_the_client_leaves
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert scheduler.in_flight["a"] == 0 and not scheduler.swaps


async def test_unload_tells_waiting_requests_and_stops_the_model():
    scheduler, processes, events = make_scheduler("a")
    processes["a"].start_gate.clear()
    waiter = asyncio.create_task(serve(scheduler, "a", []))
    await asyncio.sleep(0.02)
    await scheduler.unload(["a"])
    with pytest.raises(SchedulerError, match="group: model unloaded"):
        await waiter
    processes["a"].start_gate.set()


async def test_closed_scheduler_refuses_new_and_waiting_requests():
    scheduler, processes, _ = make_scheduler("a")
    processes["a"].start_gate.clear()
    waiter = asyncio.create_task(serve(scheduler, "a", []))
    await asyncio.sleep(0.02)
    scheduler.close()
    with pytest.raises(SchedulerError, match="group is shutting down"):
        await waiter
    with pytest.raises(SchedulerError, match="group is shutting down"):
        await serve(scheduler, "a", [])
    processes["a"].start_gate.set()


def test_default_group_runs_one_model_at_a_time():
    policy = one_at_a_time(["a", "b", "c"])
    assert policy.evictions("a", {"b", "c"}) == {"b", "c"}
    assert policy.evictions("a", {"a"}) == set()


def test_group_rules_for_swap_exclusive_and_persistent():
    policy = GroupPolicy([
        Group("llm", frozenset({"l1", "l2"})),
        Group("side", frozenset({"e1", "e2"}), swap=False, exclusive=False),
        Group("pinned", frozenset({"p"}), persistent=True),
    ])
    assert policy.evictions("l1", {"l2", "e1", "p"}) == {"l2", "e1"}  # persistent groups stay
    assert policy.evictions("e1", {"e2", "l1", "p"}) == set()  # non-exclusive, no swap: nothing stops
    assert policy.evictions("p", {"l1", "e1"}) == {"l1", "e1"}


# -- against thrashing: holds for models in steady use, a bound on every wait ---------------------


async def steady_use(scheduler: Scheduler, processes, model: str, load_time: float = 5.0) -> None:
    """`model` loaded (as if that took `load_time`) and asked for every ~0.3 s three times: a
    usual gap that a busy test machine cannot mistake for an idle model's."""
    processes[model].load_times = [load_time]
    for turn in range(3):
        await asyncio.sleep(0.3 if turn else 0)
        await serve(scheduler, model, [], hold=0.0)


async def test_a_swap_waits_while_the_loaded_model_is_in_steady_use_and_it_keeps_serving():
    scheduler, processes, events = make_scheduler("a", "b")
    await steady_use(scheduler, processes, "a")
    served: list[str] = []
    b = asyncio.create_task(serve(scheduler, "b", served))
    await asyncio.sleep(0.01)
    await serve(scheduler, "a", served)  # the agent's next call to a: no swap in between
    await b
    assert served == ["a", "b"]
    assert events == ["start a", "stop a", "start b"]


async def test_a_model_used_once_is_swapped_out_at_once():
    scheduler, processes, events = make_scheduler("a", "b")
    processes["a"].load_times = [5.0]
    await serve(scheduler, "a", [])
    began = asyncio.get_running_loop().time()
    await serve(scheduler, "b", [])
    assert asyncio.get_running_loop().time() - began < 0.5  # no usual gap known: nothing to wait for
    assert events == ["start a", "stop a", "start b"]


async def test_a_hold_ends_after_the_usual_gap_without_a_new_request():
    scheduler, processes, events = make_scheduler("a", "b")
    await steady_use(scheduler, processes, "a")
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(serve(scheduler, "b", []), 3)  # the pump after the hold ends it
    waited = asyncio.get_running_loop().time() - began
    assert 0.0 < waited < 2.0 and events[-2:] == ["stop a", "start b"]


async def test_a_request_queued_max_wait_stops_the_ready_model_from_taking_new_ones():
    scheduler, processes, events = make_scheduler("a", "b", max_wait=0.2)
    long_a = asyncio.create_task(serve(scheduler, "a", [], hold=0.5))
    await asyncio.sleep(0.05)
    served: list[str] = []
    b = asyncio.create_task(serve(scheduler, "b", served))
    await asyncio.sleep(0.05)
    await serve(scheduler, "a", served)  # b has waited less than max_wait: a still takes this one
    await asyncio.sleep(0.2)
    late_a = asyncio.create_task(serve(scheduler, "a", served))  # b is overdue now: this one queues
    await asyncio.gather(long_a, b, late_a)
    assert served == ["a", "b", "a"]
    assert events == ["start a", "stop a", "start b", "stop b", "start a"]


async def test_max_wait_zero_is_strict_arrival_order():
    scheduler, _, events = make_scheduler("a", "b", max_wait=0)
    assert await arrive_one_by_one(scheduler, "abab") == ["a", "b", "a", "b"]
    assert events.count("start a") == 2 and events.count("start b") == 2


async def test_min_residency_keeps_a_model_just_loaded_within_max_wait():
    scheduler, _, events = make_scheduler("a", "b", min_residency=0.3, max_wait=5)
    await serve(scheduler, "a", [])
    began = asyncio.get_running_loop().time()
    await serve(scheduler, "b", [])
    assert asyncio.get_running_loop().time() - began >= 0.25
    scheduler, _, events = make_scheduler("a", "b", min_residency=5, max_wait=0.2)
    await serve(scheduler, "a", [])
    await asyncio.wait_for(serve(scheduler, "b", []), 2)  # max_wait bounds the residency


async def test_a_model_asked_for_less_often_than_it_takes_to_load_is_swapped_out_at_once():
    scheduler, processes, events = make_scheduler("a", "b")
    await steady_use(scheduler, processes, "a", load_time=0.05)  # a reload costs less than its gap
    began = asyncio.get_running_loop().time()
    await serve(scheduler, "b", [])
    assert asyncio.get_running_loop().time() - began < 0.25
    assert events == ["start a", "stop a", "start b"]


async def test_a_request_held_back_by_an_overdue_one_goes_on_when_that_one_leaves():
    scheduler, _, events = make_scheduler("a", "b", max_wait=0.1)
    long_a = asyncio.create_task(serve(scheduler, "a", [], hold=1.5))
    await asyncio.sleep(0.05)
    overdue_b = asyncio.create_task(serve(scheduler, "b", []))
    await asyncio.sleep(0.2)
    served: list[str] = []
    held_a = asyncio.create_task(serve(scheduler, "a", served))  # queued behind the overdue b
    await asyncio.sleep(0.05)
    assert served == []
    overdue_b.cancel()  # its client leaves
    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(held_a, 1.0)  # at once, not when the long request ends
    assert asyncio.get_running_loop().time() - began < 0.5
    await long_a
    assert events == ["start a"]
