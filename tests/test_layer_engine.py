"""The layer engine (jaxexit/serving/layer_engine.py): layer-level continuous batching.

Its answers (exit layers and outputs) equal the offline simulation over the same ramps and the batch
engine's, for several policies at once (pcee with patience, the ensemble, pabee, static, ...) and
inputs of two length buckets sent concurrently; rows of different requests and policies share layer
steps; a request keeps the policy it arrived with when the service's policy changes; shadowed
inputs get their unshadowed answer and their ramps go to `on_shadow`; a failed step fails only its
requests; nothing compiles after the warm-up. The scheduling rule is tested on its own: the most
waiting rows, deepest first on ties, and no starvation under a steady stream of new inputs.
"""

from __future__ import annotations

import concurrent.futures
import threading

import jax
import numpy as np
import pytest

import tiny
from jaxexit.exits import offline, policies
from jaxexit.serving.engine import Engine
from jaxexit.serving import schedule
from jaxexit.serving.layer_engine import LayerEngine
from jaxexit.serving.schedule import Candidate, pick, row_buckets
from jaxexit.text import glue
from jaxexit.text.model import EarlyExitModel

MAX_BATCH = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random 3-layer BERT with mean ramps; inputs of up to 32 tokens (buckets 16 and 32). Its
    parameters are committed to the device, as a run's restored from its checkpoint are (a step's
    outputs are then committed too, which the warm-up must have compiled for)."""
    directory = tiny.make_tiny_checkpoint(tmp_path_factory.mktemp("layer-engine") / "model")
    loaded = EarlyExitModel.from_pretrained(directory, ramp_input="mean", max_length=32)
    return EarlyExitModel(loaded.config, jax.device_put(loaded.params, jax.devices()[0]), loaded.tokenizer)


@pytest.fixture(scope="module")
def inputs(model):
    """36 sentences, about half of them in each length bucket."""
    rng = np.random.default_rng(3)
    words = tiny.POSITIVE + tiny.NEGATIVE + tiny.NEUTRAL
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(2, 26, size=36)]
    rows, types = model.tokenizer.encode(texts)
    lengths = {model.tokenizer.bucket_length(len(r)) for r in rows}
    assert lengths == {16, 32}
    return rows, types, texts


@pytest.fixture(scope="module")
def ramps(model, inputs):
    """Every ramp's logits `[L, N, C]`, each input padded to its own length bucket."""
    rows, types, texts = inputs
    out = np.zeros((model.num_layers, len(rows), model.num_labels), np.float32)
    buckets = np.array([model.tokenizer.bucket_length(len(r)) for r in rows])
    for length in np.unique(buckets):
        index = np.flatnonzero(buckets == length)
        batch = model.tokenizer.pad([rows[i] for i in index], [types[i] for i in index], length=int(length))
        for layer, z in enumerate(model.ramp_steps(batch)):
            out[layer, index] = np.asarray(z)
    return out


@pytest.fixture(scope="module")
def engine(model):
    """A warmed-up engine; `engine.compiled` lists the compilations its worker thread ran (none
    should: the warm-up, in this thread, compiled every shape)."""
    compiled = []
    e = LayerEngine(model, max_batch=MAX_BATCH, max_wait_s=0.005)

    def listen(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration" and threading.current_thread() is e._thread:
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    shapes = e.warm_up()
    assert shapes == 2 * 2 * 4  # two steps, two length buckets, row buckets 1..4
    e.compiled = compiled
    yield e
    e.close()
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is not None:
        unregister(listen)


def _between(values, q: float) -> float:
    """A threshold at quantile `q` of `values`, halfway between two of them (no input sits on it)."""
    s = np.unique(np.asarray(values, np.float64))
    i = min(max(int(q * len(s)), 1), len(s) - 1)
    return float((s[i - 1] + s[i]) / 2)


def _policies(ramps) -> list[policies.Policy]:
    L, _, C = ramps.shape
    ne = policies.normalized_entropy(ramps.reshape(-1, C))
    return [
        policies.make_policy("pcee", L, C, patience=2, tau=_between(ne, 0.6)),
        policies.make_policy("pcee", L, C, patience=1, tau=_between(policies.normalized_entropy(ramps[0]), 0.4)),
        policies.make_policy("pcee+ensemble", L, C, patience=1, tau=_between(ne, 0.5)),
        policies.make_policy("entropy", L, C, S=_between(policies.entropy(ramps.reshape(-1, C)), 0.5)),
        policies.make_policy("maxprob", L, C, t=_between(policies.max_prob(ramps.reshape(-1, C)), 0.5)),
        policies.make_policy("pabee", L, C, patience=1),
        policies.make_policy("static", L, C, k=2),
    ]


def _expected(policy, ramps, index):
    sub = ramps[:, index]
    layers, _ = policies.simulate(policy, sub)
    return layers, offline.exit_outputs(policy, sub, layers)


def _requests(n: int, rng) -> list[np.ndarray]:
    """The inputs 0..n-1 in requests of 1 to 5 inputs, shuffled."""
    order = rng.permutation(n)
    cuts = np.cumsum(rng.integers(1, 6, size=n))
    return [chunk for chunk in np.split(order, cuts[cuts < n]) if len(chunk)]


# ---- answers ------------------------------------------------------------------------------------------------
def test_answers_equal_the_offline_simulation_for_every_policy_at_once(engine, inputs, ramps):
    rows, types, texts = inputs
    rng = np.random.default_rng(0)
    kinds = _policies(ramps)
    jobs = [(kinds[i % len(kinds)], idx) for i, idx in enumerate(_requests(len(rows), rng) * 2)]
    before = len(engine.steps)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # requests arrive from several threads at once
        futures = list(pool.map(lambda job: engine.submit([rows[i] for i in job[1]], [types[i] for i in job[1]],
                                                          job[0]), jobs))
    exits_seen = set()
    for (policy, idx), future in zip(jobs, futures):
        layers, outputs = future.result(60)
        want_layers, want_outputs = _expected(policy, ramps, idx)
        assert layers.tolist() == want_layers.tolist(), policy
        np.testing.assert_allclose(outputs, want_outputs, rtol=1e-5, atol=1e-6)
        exits_seen.update(zip([policy.label] * len(layers), layers.tolist()))
    assert {m for _, m in exits_seen} == {1, 2, 3}  # the settings exit inputs at every layer
    steps = list(engine.steps)[before:]
    assert max(n for *_, n in steps) >= 2  # rows of several policies (so requests) shared a step
    assert any(layer > 1 and rows_ >= 2 for layer, _, rows_, _ in steps)
    assert {length for _, length, _, _ in steps} == {16, 32}
    assert all(rows_ <= MAX_BATCH for _, _, rows_, _ in steps)
    assert engine.compiled == []


def test_answers_equal_the_batch_engine(model, engine, inputs, ramps):
    rows, types, texts = inputs
    batch_engine = Engine(model, max_batch=MAX_BATCH, max_wait_s=0.005)
    try:
        for policy in _policies(ramps)[:3]:
            requests = _requests(len(rows), np.random.default_rng(1))
            mine = [engine.submit([rows[i] for i in r], [types[i] for i in r], policy) for r in requests]
            theirs = [batch_engine.submit([rows[i] for i in r], [types[i] for i in r], policy) for r in requests]
            for a, b in zip(mine, theirs):
                (la, oa), (lb, ob) = a.result(60), b.result(60)
                assert la.tolist() == lb.tolist()
                np.testing.assert_allclose(oa, ob, rtol=1e-5, atol=1e-6)
    finally:
        batch_engine.close()
    assert engine.compiled == []


def test_a_shadowed_input_gets_its_unshadowed_answer_and_its_ramps_are_heard(engine, inputs, ramps):
    rows, types, texts = inputs
    policy = _policies(ramps)[0]
    heard = []
    engine.on_shadow = lambda p, r, layers, outputs: heard.append((p, np.asarray(r), layers, outputs))
    try:
        shadow = [i % 3 == 0 for i in range(12)]
        layers, outputs = engine.submit(rows[:12], types[:12], policy, shadow).result(60)
    finally:
        engine.on_shadow = None
    want_layers, want_outputs = _expected(policy, ramps, np.arange(12))
    assert layers.tolist() == want_layers.tolist()
    np.testing.assert_allclose(outputs, want_outputs, rtol=1e-5, atol=1e-6)
    assert all(p == policy for p, *_ in heard) and sum(r.shape[1] for _, r, _, _ in heard) == 4
    got = np.concatenate([r for _, r, _, _ in heard], axis=1)  # [L, 4, C], in the order they finished
    want = ramps[:, [0, 3, 6, 9]]
    order = [int(np.argmin(np.abs(want[-1] - got[-1, j]).sum(-1))) for j in range(4)]
    assert sorted(order) == [0, 1, 2, 3]
    np.testing.assert_allclose(got, want[:, order], rtol=1e-5, atol=1e-6)  # every layer's ramp, not only the exit's
    assert engine.compiled == []


def test_a_policy_change_keeps_the_requests_in_flight_on_their_policy(model, inputs, ramps):
    from jaxexit.serving.service import Service

    rows, types, texts = inputs
    first, second = _policies(ramps)[1], _policies(ramps)[6]
    service = Service(model, glue.get_task("sst2"), None, max_batch=MAX_BATCH, engine="layer")
    try:
        assert isinstance(service.engine, LayerEngine)
        service.set_policy({"policy": "pcee", **dict(first.params)})
        before, active = service.submit(texts[:20])[:2]
        service.set_policy({"policy": "static", "k": 2})  # while the first request is on its way
        after, later = service.submit(texts[20:])[:2]
        assert active.policy == first and later.policy == second
        for future, policy, idx in ((before, first, np.arange(20)), (after, second, np.arange(20, len(rows)))):
            layers, _ = future.result(60)
            assert layers.tolist() == _expected(policy, ramps, idx)[0].tolist()
    finally:
        service.close()


def test_a_failed_step_fails_only_its_requests(engine, inputs, ramps):
    rows, types, texts = inputs
    policy = _policies(ramps)[6]  # static k=2: every row reaches layer 2
    real = engine._advance
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the device went away")
        return real(*args)

    engine._advance = broken
    try:
        failed = engine.submit(rows[:1], types[:1], policy)
        with pytest.raises(RuntimeError, match="went away"):
            failed.result(60)
        layers, _ = engine.submit(rows[:6], types[:6], policy).result(60)  # the worker goes on
    finally:
        engine._advance = real
    assert layers.tolist() == [2] * 6


def test_bad_settings_are_refused(model):
    for kwargs, match in (({"max_batch": 0}, "max_batch"), ({"max_wait_s": -1}, "max_wait"),
                          ({"max_age": 0}, "max_age"), ({"slots": 2}, "slots")):
        with pytest.raises(ValueError, match=match):
            LayerEngine(model, **kwargs)


# ---- the scheduling rule ----------------------------------------------------------------------------------
def test_the_deepest_queue_runs_first_then_the_fuller_then_the_shorter():
    c = [Candidate(1, 32, 7, 0), Candidate(3, 32, 2, 1), Candidate(2, 16, 5, 2)]
    assert pick(c, max_batch=8, max_age=6) == Candidate(3, 32, 2, 1)  # 2 rows at layer 3 before 7 at layer 1
    assert pick(c + [Candidate(3, 64, 3, 0)], 8, 6) == Candidate(3, 64, 3, 0)  # at one layer: more rows
    assert pick(c + [Candidate(3, 16, 2, 0)], 8, 6) == Candidate(3, 16, 2, 0)  # and rows alike: shorter
    assert pick([], 8, 6) is None


def test_a_queue_that_fills_a_step_runs_before_deeper_ones():
    c = [Candidate(1, 32, 8, 0), Candidate(3, 32, 2, 1), Candidate(2, 16, 9, 2)]
    assert pick(c, 8, 6) == Candidate(2, 16, 9, 2)  # of the full queues the deepest
    assert pick(c[:2], 8, 6) == Candidate(1, 32, 8, 0)
    assert pick([Candidate(4, 16, 40, 0), Candidate(4, 32, 8, 0)], 8, 6).length == 16  # rows counted up to 8


def test_a_row_past_the_age_bound_runs_first():
    c = [Candidate(1, 32, 8, 5), Candidate(3, 16, 1, 6), Candidate(5, 16, 1, 6), Candidate(2, 16, 1, 7)]
    assert pick(c, 8, 6) == Candidate(2, 16, 1, 7)  # the longest-waiting of the starving queues
    assert pick(c[:3], 8, 6) == Candidate(5, 16, 1, 6)  # deepest among equally old ones
    assert pick([Candidate(1, 32, 4, 6), Candidate(3, 16, 1, 5)], 8, 6) == Candidate(1, 32, 4, 6)
    assert pick([Candidate(1, 32, 4, 5), Candidate(3, 16, 1, 5)], 8, 6) == Candidate(3, 16, 1, 5)  # under it


def test_row_buckets_are_every_count_up_to_a_quarter_then_eighths():
    assert row_buckets(32) == (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 28, 32)
    assert row_buckets(12) == (1, 2, 3, 4, 6, 8, 10, 12)
    assert row_buckets(4) == (1, 2, 3, 4) and row_buckets(1) == (1,)


def _stream(max_age: int, steps: int = 400, layers: int = 6, max_batch: int = 4, seed: int = 0):
    """Rows as (arrival step, exit layer, queued since); one new input (of two lengths) a step at
    layer 1, each leaving at a random layer. Returns each row's longest wait at a queue, in steps."""
    rng = np.random.default_rng(seed)
    queues: dict[tuple[int, int], list] = {}
    waits: list[int] = []
    for step in range(steps):
        queues.setdefault((1, int(rng.choice([16, 32]))), []).append([int(rng.integers(1, layers + 1)), step, 0])
        cands = [Candidate(layer, length, len(q), step - q[0][1]) for (layer, length), q in queues.items() if q]
        choice = schedule.pick(cands, max_batch, max_age)
        queue = queues[(choice.layer, choice.length)]
        for row in queue[:max_batch]:
            row[2] = max(row[2], step - row[1])
            if row[0] == choice.layer:
                waits.append(row[2])
            else:
                queues.setdefault((choice.layer + 1, choice.length), []).append([row[0], step + 1, row[2]])
        del queue[:max_batch]
    return waits, sum(len(q) for q in queues.values())


def test_full_steps_keep_up_with_a_stream_that_deepest_first_alone_falls_behind(monkeypatch):
    """One new input a step, at most 4 rows a step: deepest first alone runs deep queues a row at a
    time while layer 1 piles up (with no age bound, waits grow with the run); running full queues
    first keeps up, and waits stay bounded however long it runs."""
    assert _stream(10**9, steps=400)[1] < 25
    waits = [max(_stream(10**9, steps=n)[0]) for n in (400, 4000)]
    assert waits[1] <= waits[0] + 10
    monkeypatch.setattr(schedule, "pick", lambda c, b, a: max(c, key=lambda q: (q.layer, min(q.rows, b))))
    assert _stream(10**9, steps=4000)[1] > 500  # deepest first alone: hundreds of inputs left waiting


def test_the_age_bound_caps_the_wait_of_new_inputs():
    """Deep rows that keep the engine busy: layer 1 is passed over until its oldest row has waited
    max_age steps, then runs first."""
    max_age = 3
    waiting = {1: 1, **{layer: 8 for layer in range(2, 7)}}  # drained deepest first, one step a layer
    since = {1: 0}
    ran = []
    for step in range(12):
        cands = [Candidate(layer, 16, n, step - since.get(layer, step)) for layer, n in waiting.items() if n]
        choice = pick(cands, 8, max_age)
        moved = min(choice.rows, 8)
        waiting[choice.layer] -= moved
        if choice.layer < 6:
            waiting[choice.layer + 1] += moved
        ran.append(choice.layer)
    assert ran.index(1) == max_age and 1 not in ran[:max_age]
