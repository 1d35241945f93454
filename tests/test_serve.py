"""jaxexit-serve (infer/serve.py): the real server as a subprocess on a loopback port, driven by a real HTTP client.

Its answers equal infer/run.py's offline predictions for the same policy; replacing the policy
under a concurrent load loses no request and changes the realised saving from the requests that
start after the change; every bad input gets a 4xx naming the problem; /metrics parses; nothing
compiles after the warm-up. The engine, the calibration table and the latency controller are also
tested in-process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tiny
from conftest import REPO
from jaxexit.text import glue, metrics
from jaxexit.exits import offline, policies, runners
from jaxexit.text.model import EarlyExitModel
from jaxexit.training.checkpoint import RunDir
from jaxexit.cli import infer as infer_cli, serve as serve_cli
from jaxexit.serving.controller import Controller
from jaxexit.serving.engine import Engine
from jaxexit.serving.errors import RequestError
from jaxexit.serving.service import Service
from jaxexit.serving.table import load_table
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny SST-2 run and a tiny STS-B run (pairs, regression), mean ramps, one epoch each."""
    root = tmp_path_factory.mktemp("serve")
    model, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=48)
    runs = {}
    for task, folder in (("sst2", "SST-2"), ("stsb", "STS-B")):
        cfg = TrainConfig(task=task, model=str(model), data_dir=str(data / folder), scheme="joint", batch_size=8,
                          max_length=32, lr=1e-3, epochs=1.0, seed=1, ramp_input="mean",
                          output_dir=str(root / "runs"), run_name=task)
        runs[task] = finetune(cfg, progress=False).path
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(run, *flags, timeout: float = 240.0):
    """infer/serve.py on `run` in a subprocess; yields (base URL, a function returning its log)."""
    port = _free_port()
    log = open(run / f"serve-{port}.log", "w+")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(REPO / "infer" / "serve.py"), "--checkpoint", str(run),
                             "--port", str(port), "--max-batch", "4", *flags],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.flush()
        return (run / f"serve-{port}.log").read_text()

    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"infer/serve.py exited with {proc.returncode}:\n{output()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"infer/serve.py did not answer /healthz in {timeout} s:\n{output()}")
            time.sleep(0.3)
        yield url, output
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def sst2_server(tiny_runs):
    with serving(tiny_runs["sst2"], "--target-saving", "0", "--max-inputs", "16", "--max-body-bytes", "4096") as s:
        yield s


def _dev_texts(run) -> list[str]:
    examples = glue.load_examples(glue.get_task("sst2"), "validation", RunDir(run).train_config()["data_dir"])
    return [ex.text_a for ex in examples]


def _metrics(url: str) -> dict:
    """`{(name, labels as a sorted tuple): value}` from /metrics, through prometheus_client's parser."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _median_tau(run) -> float:
    """A pcee tau that sends about half the dev inputs out at layer 1 (patience 1)."""
    model = EarlyExitModel.from_run(run)
    task = glue.get_task("sst2")
    examples = glue.load_examples(task, "validation", RunDir(run).train_config()["data_dir"])
    from jaxexit.text import batches

    logits = offline.parts(runners.cached_logits(model, batches.encode_examples(model.tokenizer, task, examples)))[0]
    return float(np.median(policies.normalized_entropy(logits[0])))


# ---- over HTTP ------------------------------------------------------------------------------------------
def test_answers_equal_infer_run_offline_predictions(sst2_server, tiny_runs, tmp_path):
    url, _ = sst2_server
    run = tiny_runs["sst2"]
    tau = round(_median_tau(run), 6)
    put = httpx.put(url + "/v1/policy", json={"policy": "pcee", "patience": 1, "tau": tau})
    assert put.status_code == 200, put.text
    assert put.json()["active"] == {"policy": "pcee", "patience": 1, "tau": tau, "target_saving": None}

    texts = _dev_texts(run)
    chunks = [texts[i: i + 3] for i in range(0, len(texts), 3)]  # concurrent requests share batches
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: httpx.post(url + "/v1/classify", json={"texts": c}, timeout=60), chunks))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    got = [r for a in answers for r in a.json()["results"]]
    assert all(a.json()["policy"]["tau"] == tau for a in answers)

    infer_cli.run(["--checkpoint", str(run), "--policy", "pcee", "--patience", "1", "--tau", str(tau),
                   "--mode", "offline", "--output", str(tmp_path / "pred.tsv"), "--json", str(tmp_path / "r.json")])
    with open(tmp_path / "pred.exits.tsv") as f:
        want = list(csv.DictReader(f, delimiter="\t"))
    assert len(got) == len(want) == len(texts)
    assert [r["exit_layer"] for r in got] == [int(w["exit_layer"]) for w in want]
    assert [r["label_id"] for r in got] == [int(w["prediction"]) for w in want]
    assert len({r["exit_layer"] for r in got}) >= 2  # the setting is not degenerate
    for r in got:
        assert r["label"] == ("negative", "positive")[r["label_id"]]
        assert sum(r["probabilities"]) == pytest.approx(1.0) and np.argmax(r["probabilities"]) == r["label_id"]


def test_policy_change_under_load_loses_nothing_and_applies_to_later_requests(sst2_server, tiny_runs):
    url, _ = sst2_server
    assert httpx.put(url + "/v1/policy", json={"policy": "static", "k": 3}).status_code == 200  # the full model
    before = _metrics(url)
    texts = _dev_texts(tiny_runs["sst2"])
    records, lock = [], threading.Lock()

    def client(c: int):
        with httpx.Client(timeout=60) as http:
            for i in range(50):
                start = time.monotonic()
                r = http.post(url + "/v1/classify", json={"texts": [texts[(c * 50 + i) % len(texts)]]})
                with lock:
                    records.append((start, time.monotonic(), r.status_code, r.json()))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    while True:  # change the policy in the middle of the load
        with lock:
            if len(records) >= 300:
                break
        time.sleep(0.01)
    put_start = time.monotonic()
    put = httpx.put(url + "/v1/policy", json={"policy": "pcee", "patience": 1, "tau": 1.0})  # everyone exits at 1
    put_end = time.monotonic()
    for t in threads:
        t.join()
    assert put.status_code == 200
    assert len(records) == 800 and all(code == 200 for _, _, code, _ in records)
    old = [b for s, e, _, b in records if e < put_start]
    new = [b for s, e, _, b in records if s > put_end]
    assert old and new
    assert all(b["policy"] == {"policy": "static", "k": 3, "target_saving": None} for b in old)
    assert all(b["policy"] == {"policy": "pcee", "patience": 1, "tau": 1.0, "target_saving": None} for b in new)
    saving = lambda bodies: 1 - np.mean([r["exit_layer"] for b in bodies for r in b["results"]]) / 3  # noqa: E731
    assert saving(old) == 0 and saving(new) == pytest.approx(2 / 3)
    after = _metrics(url)
    key = ("jaxexit_requests_total", (("code", "200"), ("endpoint", "/v1/classify")))
    assert after[key] - before.get(key, 0) == 800
    assert after[("jaxexit_inputs_total", ())] - before.get(("jaxexit_inputs_total", ()), 0) == 800
    batches = after[("jaxexit_batch_inputs_count", ())] - before.get(("jaxexit_batch_inputs_count", ()), 0)
    assert batches < 800  # concurrent requests shared batches
    assert after[("jaxexit_compiles_after_warmup_total", ())] == 0  # no request compiled anything


BAD_CLASSIFY = [  # (body, status, words in the error)
    ({"texts": []}, 422, "empty"),
    ({"texts": [1, 2]}, 422, "texts[0]"),
    ({"texts": "a film"}, 422, "texts"),
    ({"pairs": [["a film", "a movie"]]}, 422, "single sentences"),
    ({"texts": ["a"], "pairs": [["a", "b"]]}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"texts": ["a"], "extra": 1}, 422, "extra"),
    ({"texts": ["good"] * 17}, 413, "at most 16"),
    ({"texts": ["good film " * 500]}, 413, "4096 bytes"),
]
BAD_POLICY = [
    ({"policy": "fastest"}, "unknown exit policy"),
    ({"policy": "pcee", "patience": 1, "tau": 2.0}, "tau must be in"),
    ({"policy": "pcee", "patience": 0, "tau": 0.5}, "patience"),
    ({"policy": "entropy", "tau": 0.5}, "tau"),
    ({"policy": "berxit", "t": 0.1}, "learning-to-exit"),
    ({"target_saving": 1.5}, "[0, 1)"),
    ({"target_saving": 0.2, "tau": 1.5}, "tau must be in"),
    ({"target_saving": "half"}, "target_saving"),
    ({"speed": "fast"}, "unknown field"),
    ({"policy": "pcee", "patience": 1, "tau": "low"}, "must be a number"),
    ([1, 2], "JSON object"),
]


def test_every_bad_input_gets_a_4xx_naming_it(sst2_server):
    url, _ = sst2_server
    for body, status, words in BAD_CLASSIFY:
        r = httpx.post(url + "/v1/classify", json=body)
        assert r.status_code == status and words in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.post(url + "/v1/classify", content=b'{"texts": ["unclosed"')
    assert r.status_code == 422 and "JSON" in r.json()["error"]
    r = httpx.post(url + "/v1/classify", content=iter([b'{"texts": ["', b"x" * 5000, b'"]}']))  # chunked, no length
    assert r.status_code == 413
    policy = httpx.get(url + "/v1/policy").json()["active"]
    for body, words in BAD_POLICY:
        r = httpx.put(url + "/v1/policy", json=body)
        assert r.status_code == 422 and words in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.put(url + "/v1/policy", content=b"not json")
    assert r.status_code == 422 and "not JSON" in r.json()["error"]
    for body, words in (({"target_saving": 0.99}, "beyond what pcee reaches"),  # what the table cannot meet: 409
                        ({"target_saving": 0.2, "tau": 0.123}, "no pcee setting with tau=0.123")):
        r = httpx.put(url + "/v1/policy", json=body)
        assert r.status_code == 409 and words in r.json()["error"], (body, r.status_code, r.text)
    assert httpx.get(url + "/v1/policy").json()["active"] == policy  # refused changes change nothing
    assert httpx.post(url + "/v1/classify", json={"texts": ["a good film"]}).status_code == 200
    errors = _metrics(url)
    assert errors[("jaxexit_request_errors_total", (("code", "413"), ("endpoint", "/v1/classify")))] >= 3


def test_metrics_parse_and_policy_reads_back(sst2_server):
    url, _ = sst2_server
    assert httpx.put(url + "/v1/policy", json={"target_saving": 0.3}).status_code == 200
    httpx.post(url + "/v1/classify", json={"texts": ["a good film", "a dull plot"]})
    described = httpx.get(url + "/v1/policy").json()
    active = described["active"]
    assert active["policy"] == "pcee" and active["target_saving"] == 0.3 and active["calibration"]["saving"] >= 0.3
    assert described["table"]["max_saving"]["pcee"] >= 0.3 and described["task"] == "SST-2"
    m = _metrics(url)
    assert m[("jaxexit_target_saving", ())] == 0.3
    assert m[("jaxexit_expected_saving", ())] == pytest.approx(active["calibration"]["saving"])
    assert 0 <= m[("jaxexit_realised_saving", ())] <= 2 / 3
    assert m[("jaxexit_exit_layer_count", ())] == m[("jaxexit_inputs_total", ())]
    assert m[("jaxexit_request_latency_seconds_count", ())] >= 1
    assert m[("jaxexit_policy_changes_total", (("source", "api"),))] >= 1
    health = httpx.get(url + "/healthz").json()
    assert health["status"] == "ok" and health["num_layers"] == 3


def test_pair_task_regression_answers_and_the_reverse_mismatch(tiny_runs):
    with serving(tiny_runs["stsb"], "--policy", "pabee", "--patience", "1", "--delta", "0.5") as (url, output):
        r = httpx.post(url + "/v1/classify", json={"pairs": [["a good film", "a great movie"], ["dull", "bad"]]})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert all(set(x) == {"score", "exit_layer", "truncated"} and not x["truncated"] for x in results)
        model = EarlyExitModel.from_run(tiny_runs["stsb"])
        batch = model.tokenize(["a good film", "dull"], ["a great movie", "bad"])
        policy = policies.make_policy("pabee", 3, 1, patience=1, delta=0.5)
        layers, outs = runners.exit_batch(model, policy, batch, 2)
        assert [x["exit_layer"] for x in results] == layers.tolist()
        np.testing.assert_allclose([x["score"] for x in results], outs[:, 0], rtol=1e-5, atol=1e-5)
        r = httpx.post(url + "/v1/classify", json={"texts": ["a film"]})
        assert r.status_code == 422 and "sentence pairs" in r.json()["error"]
        r = httpx.post(url + "/v1/classify", json={"pairs": [["a", "b", "c"]]})
        assert r.status_code == 422 and "pairs[0]" in r.json()["error"]
        for body, words in (({"pairs": [["a good film", "a great movie"], ["a good film", ""]]}, "pairs[1][1] is empty"),
                            ({"pairs": [["", "a great movie"]]}, "pairs[0][0] is empty"),
                            ({"pairs": [["a", "b"]], "texts": None}, "sentence pairs")):
            r = httpx.post(url + "/v1/classify", json=body)
            assert r.status_code == 422 and words in r.json()["error"], (body, r.text)
            assert httpx.post(url + "/v1/classify", json={"pairs": [["a", "b"]]}).status_code == 200
        r = httpx.put(url + "/v1/policy", json={"policy": "entropy", "S": 0.1})
        assert r.status_code == 422 and "regression" in r.json()["error"]
        assert "warm-up" in output() and "serving" in output()


def test_latency_objective_raises_the_target_under_load(tiny_runs):
    flags = ["--latency-slo-ms", "0.001", "--control-interval-s", "0.2", "--control-window-s", "2",
             "--control-step", "0.2"]  # an objective no request meets: the target must climb
    with serving(tiny_runs["sst2"], *flags) as (url, output):
        assert httpx.get(url + "/v1/policy").json()["active"]["target_saving"] == 0.0
        deadline = time.monotonic() + 60
        with httpx.Client() as http:
            while time.monotonic() < deadline:
                http.post(url + "/v1/classify", json={"texts": ["a good film"]})
                if http.get(url + "/v1/policy").json()["active"]["target_saving"] > 0.3:
                    break
        described = httpx.get(url + "/v1/policy").json()
        assert described["active"]["target_saving"] > 0.3 and described["controller"]["changes"] >= 2
        m = _metrics(url)
        assert m[("jaxexit_policy_changes_total", (("source", "controller"),))] >= 2
        assert m[("jaxexit_latency_p95_seconds", ())] > 1e-6
        assert "controller: p95" in output()


def test_bad_flags_end_with_one_error_line(tiny_runs, capsys):
    for argv, words in ((["--port", "0"], "--port"), (["--target-saving", "1.2"], "--target-saving"),
                        (["--no-table", "--target-saving", "0.3"], "--no-table"),
                        (["--latency-slo-ms", "100", "--min-saving", "0.5", "--max-saving", "0.2"], "--max-saving"),
                        (["--checkpoint", str(tiny_runs["sst2"] / "missing")], "does not exist")):
        with pytest.raises(SystemExit) as e:
            serve_cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


# ---- in-process --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_runs):
    run = RunDir(tiny_runs["sst2"])
    model = EarlyExitModel.from_run(run.path)
    task = glue.get_task("sst2")
    table = load_table(run, model, task, "validation", run.train_config()["data_dir"])
    s = Service(model, task, table, max_batch=4, max_wait_s=0.05)
    yield s
    s.close()


def test_a_batch_holds_one_policy_and_answers_equal_exit_batch(service):
    model = service.model
    rows, types = model.tokenizer.encode(["a good film", "the plot was dull", "great", "a very boring movie is"])
    a = policies.make_policy("pcee", 3, 2, patience=1, tau=1.0)
    b = policies.make_policy("static", 3, 2, k=2)
    seen = []
    original = service.engine.run
    service.engine.run = lambda policy, r, t, **k: seen.append((policy, len(r))) or original(policy, r, t, **k)
    try:
        futures = [service.engine.submit(rows[:2], types[:2], a), service.engine.submit(rows[2:], types[2:], b),
                   service.engine.submit(rows[:3], types[:3], a)]
        out = [f.result(30) for f in futures]
    finally:
        service.engine.run = original
    assert {p for p, _ in seen} == {a, b} and sum(n for _, n in seen) == 7
    for policy, (layers, outputs), (lo, hi) in zip((a, b, a), out, ((0, 2), (2, 4), (0, 3))):
        want_layers, want_out = runners.exit_batch(model, policy, model.tokenizer.pad(rows[lo:hi], types[lo:hi]), hi - lo)
        assert layers.tolist() == want_layers.tolist()
        np.testing.assert_allclose(outputs, want_out, rtol=1e-5, atol=1e-6)
    assert out[0][0].tolist() == [1, 1] and out[1][0].tolist() == [2, 2]


def test_engine_refuses_bad_settings_and_a_failed_batch_fails_only_its_requests(service):
    with pytest.raises(ValueError, match="max_batch"):
        Engine(service.model, max_batch=0)
    with pytest.raises(ValueError, match="max_wait"):
        Engine(service.model, max_wait_s=-1)
    broken = policies.make_policy("static", 3, 2, k=1)
    fine = policies.make_policy("static", 3, 2, k=3)
    original = service.engine.run

    def run(policy, rows, types, **kwargs):
        if policy == broken:
            raise RuntimeError("the device went away")
        return original(policy, rows, types, **kwargs)

    service.engine.run = run
    try:
        rows, types = service.model.tokenizer.encode(["a good film"])
        failed = service.engine.submit(rows, types, broken)
        with pytest.raises(RuntimeError, match="went away"):
            failed.result(30)
        assert service.engine.submit(rows, types, fine).result(30)[0].tolist() == [3]  # the worker goes on
    finally:
        service.engine.run = original


def test_target_saving_maps_through_the_table_like_infer_run(service):
    table = service.table
    for target in (0.0, 0.2, 0.5):
        active = service.resolve({"target_saving": target})
        cal = offline.calibrate("pcee", table.outputs, table.labels, metrics.primary_scorer(service.task),
                                target_saving=target)
        assert active.policy == cal.policy and active.row["saving"] >= target
    held = service.resolve({"target_saving": 0.2, "policy": "pcee", "patience": 2})
    assert held.policy["patience"] == 2 and dict(held.fixed) == {"patience": 2}
    with pytest.raises(RequestError, match="no pcee setting with tau=0.123") as e:
        service.resolve({"target_saving": 0.2, "policy": "pcee", "tau": 0.123})
    assert e.value.status == 409  # a valid value off the table's grid: the table's state
    with pytest.raises(RequestError, match="tau must be in") as e:
        service.resolve({"target_saving": 0.2, "policy": "pcee", "tau": 1.5})
    assert e.value.status == 422


def test_stored_table_is_read_back_and_recomputed_when_the_model_changes(tiny_runs, monkeypatch):
    run = RunDir(tiny_runs["sst2"])
    model = EarlyExitModel.from_run(run.path)
    task = glue.get_task("sst2")
    first = load_table(run, model, task, "validation", run.train_config()["data_dir"])
    assert (run.path / "serving" / "outputs-validation.npz").is_file()
    calls = []
    real = runners.cached_logits
    monkeypatch.setattr(runners, "cached_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_table(run, model, task, "validation", run.train_config()["data_dir"])
    assert calls == [] and np.array_equal(offline.parts(again.outputs)[0], offline.parts(first.outputs)[0])
    some = next(p for p in (run.path / "model").rglob("*") if p.is_file())
    os.utime(some, ns=(time.time_ns(), time.time_ns()))  # the parameters were rewritten
    load_table(run, model, task, "validation", run.train_config()["data_dir"])
    assert calls == [1]


def test_controller_moves_the_target_up_when_slow_and_down_with_room(service):
    service.set_policy({"target_saving": 0.2})
    controller = Controller(service, slo_s=0.1, min_saving=0.0, max_saving=0.6, step=0.1, window_s=60)
    layers, outs = np.array([3]), np.zeros((1, 2), np.float32)
    now = time.perf_counter()
    for _ in range(10):
        service.answer(service.active, layers, outs, arrived=now - 0.5)  # 500 ms each: over the objective
    assert controller.tick() == pytest.approx(0.3) and service.active.target == pytest.approx(0.3)
    assert service.active.source == "controller"
    service._latencies.clear()
    for _ in range(10):
        service.answer(service.active, layers, outs, arrived=time.perf_counter() - 0.01)  # 10 ms: room
    assert controller.tick() == pytest.approx(0.2)
    service.set_policy({"policy": "static", "k": 3})  # explicit thresholds: the controller stands aside
    assert controller.tick() is None and service.active.target is None
    with pytest.raises(ValueError, match="min saving"):
        Controller(service, slo_s=0.1, min_saving=0.5, max_saving=0.2)
    json.dumps(service.describe_policy())  # what GET /v1/policy answers is JSON


def test_exit_batch_reports_each_row_once_as_it_exits(service, tiny_runs):
    model = service.model
    texts = _dev_texts(tiny_runs["sst2"])[:7]
    rows, types = model.tokenizer.encode(texts)
    filled = list(range(7)) + [0]  # a row bucket of 8 with one filler row
    batch = model.tokenizer.pad([rows[i] for i in filled], [types[i] for i in filled])
    policy = policies.make_policy("pcee", 3, 2, patience=1, tau=_median_tau(tiny_runs["sst2"]))
    heard = []
    layers, outputs = runners.exit_batch(model, policy, batch, 7, cap=16,
                                         on_exit=lambda r, m, z: heard.append((r.copy(), m, z.copy())))
    assert sorted(i for r, _, _ in heard for i in r.tolist()) == list(range(7))  # each real row once, no filler
    assert [m for _, m, _ in heard] == sorted({m for _, m, _ in heard})  # layer by layer, in order
    assert len(heard) >= 2  # the setting exits rows at more than one layer
    for r, m, z in heard:
        assert (layers[r] == m).all()
        np.testing.assert_array_equal(z, outputs[r])
    alone, _ = runners.exit_batch(model, policy, model.tokenizer.pad(rows, types), 7)
    assert alone.tolist() == layers.tolist()  # the cap's buckets change shapes, not exits
    with pytest.raises(ValueError, match="row buckets of 4"):
        runners.exit_batch(model, policy, batch, 7, cap=4)
