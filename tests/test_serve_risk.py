"""Risk targets, shadow traffic and re-calibration in the service (docs/serving.md, "Risk targets").

One real server (infer/serve.py on loopback, started certified with --max-risk and shadowing every
input): PUT /v1/policy certifies with `risk.certify` on the calibration table's outputs, GET shows
the certificate, bad values get a 4xx, shadowed answers are the policy's, POST /v1/calibrate
re-certifies on the shadow buffer alone, /metrics shows the bound and the buffer. In-process: a
shadowed input's answer equals its unshadowed answer, and a buffer whose ramps disagree with the
full model changes what re-calibration certifies.
"""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

import tiny
from jaxexit.cli import serve as serve_cli
from jaxexit.exits import offline, policies, risk, runners
from jaxexit.serving.errors import RequestError
from jaxexit.serving.service import Service
from jaxexit.serving.shadow import ShadowBuffer
from jaxexit.serving.table import load_table
from jaxexit.text import batches, glue
from jaxexit.text.model import EarlyExitModel
from jaxexit.text.train_config import TrainConfig
from jaxexit.text.trainer import finetune
from jaxexit.training.checkpoint import RunDir
from test_serve import _metrics, serving

BUFFER = 40  # the server's --shadow-buffer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SST-2 run (mean ramps, one epoch) with 160 labelled dev inputs to certify on."""
    root = tmp_path_factory.mktemp("serve-risk")
    model, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=160)
    cfg = TrainConfig(task="sst2", model=str(model), data_dir=str(data / "SST-2"), scheme="joint", batch_size=8,
                      max_length=32, lr=1e-3, epochs=1.0, seed=1, ramp_input="mean", output_dir=str(root / "runs"),
                      run_name="sst2")
    return finetune(cfg, progress=False).path


@pytest.fixture(scope="module")
def table(run):
    rd = RunDir(run)
    model = EarlyExitModel.from_run(run)
    return load_table(rd, model, glue.get_task("sst2"), "validation", rd.train_config()["data_dir"])


@pytest.fixture(scope="module")
def server(run, table):  # after the table: the server reads the stored outputs
    with serving(run, "--max-risk", "0.2", "--shadow-rate", "1.0", "--shadow-buffer", str(BUFFER),
                 "--max-inputs", "64") as s:
        yield s


def _texts(run) -> list[str]:
    examples = glue.load_examples(glue.get_task("sst2"), "validation", RunDir(run).train_config()["data_dir"])
    return [ex.text_a for ex in examples]


def _classify(url, texts) -> list[dict]:
    r = httpx.post(url + "/v1/classify", json={"texts": texts}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


# ---- over HTTP --------------------------------------------------------------------------------------------
def test_put_certifies_on_the_table_and_get_shows_the_certificate(server, table):
    url, output = server
    active = httpx.get(url + "/v1/policy").json()["active"]  # --max-risk 0.2 at start
    want = risk.certify("pcee", table.outputs, max_risk=0.2, delta=0.1)
    assert want.certified and active["certificate"]["certified"]
    assert active["certificate"]["n"] == table.size == 160 and active["certificate"]["params"] == want.params
    assert {k: active[k] for k in want.params} == want.params
    assert active["risk_target"]["max_risk"] == 0.2 and active["target_saving"] is None
    assert "certified pcee" in output()

    put = httpx.put(url + "/v1/policy", json={"max_risk": 0.1, "risk_delta": 0.2, "risk": "drop",
                                              "risk_bound": "hb", "policy": "pcee", "patience": 2})
    assert put.status_code == 200, put.text
    cert = put.json()["active"]["certificate"]
    want = risk.certify("pcee", table.outputs, risk="drop", max_risk=0.1, delta=0.2, labels=table.labels,
                        method="hb", fixed={"patience": 2})
    assert cert == {**want.as_dict(), "calibrated_on": table.source}
    assert cert["params"]["patience"] == 2 and cert["bound"] <= 0.1 and cert["risk"] == "drop"
    assert httpx.get(url + "/v1/policy").json()["active"]["certificate"] == cert

    m = _metrics(url)
    assert m[("jaxexit_risk_bound", ())] == pytest.approx(cert["bound"]) and m[("jaxexit_max_risk", ())] == 0.1
    assert m[("jaxexit_expected_saving", ())] == pytest.approx(cert["saving"])

    put = httpx.put(url + "/v1/policy", json={"max_risk": 0.001})  # 160 inputs cannot certify 0.1%
    assert put.status_code == 200, put.text
    active = put.json()["active"]
    assert not active["certificate"]["certified"] and "too few" in active["certificate"]["reason"]
    fallback = risk.certify("pcee", table.outputs, max_risk=0.001).policy  # the full model
    assert {k: active[k] for k in ("policy", *dict(fallback.params))} == fallback.as_dict()
    assert {r["exit_layer"] for r in _classify(url, ["a good film", "dull"])} == {3}

    assert httpx.put(url + "/v1/policy", json={"policy": "static", "k": 3}).status_code == 200
    assert "certificate" not in httpx.get(url + "/v1/policy").json()["active"]
    assert math.isnan(_metrics(url)[("jaxexit_risk_bound", ())])


BAD_RISK = [  # (body, words in the error)
    ({"max_risk": 0}, "max_risk must be"),
    ({"max_risk": 1.5}, "max_risk must be"),
    ({"max_risk": "low"}, "max_risk must be"),
    ({"max_risk": 0.1, "risk_delta": 1}, "risk_delta must be"),
    ({"max_risk": 0.1, "risk": "loss"}, "unknown risk"),
    ({"max_risk": 0.1, "risk_bound": "chernoff"}, "unknown bound"),
    ({"max_risk": 0.1, "risk_tolerance": 0.5}, "regression only"),
    ({"risk_delta": 0.1}, "only with a max_risk"),
    ({"max_risk": 0.1, "target_saving": 0.2}, "not both"),
    ({"max_risk": 0.1, "policy": "pcee", "patience": 1, "tau": 0.5}, "nothing is left to calibrate"),
    ({"max_risk": 0.1, "policy": "fastest"}, "unknown exit policy"),
]


def test_bad_risk_values_and_calibrations_are_refused(server):
    url, _ = server
    assert httpx.put(url + "/v1/policy", json={"policy": "static", "k": 2}).status_code == 200
    before = httpx.get(url + "/v1/policy").json()["active"]
    for body, words in BAD_RISK:
        r = httpx.put(url + "/v1/policy", json=body)
        assert r.status_code == 422 and words in r.json()["error"], (body, r.status_code, r.text)
    r = httpx.post(url + "/v1/calibrate")
    assert r.status_code == 409 and "not a risk target" in r.json()["error"]
    assert httpx.put(url + "/v1/policy", json={"max_risk": 0.2, "risk": "drop"}).status_code == 200
    r = httpx.post(url + "/v1/calibrate")
    assert r.status_code == 409 and "needs labels" in r.json()["error"]
    assert httpx.put(url + "/v1/policy", json={"policy": "static", "k": 2}).status_code == 200
    assert httpx.get(url + "/v1/policy").json()["active"] == before


def test_shadowed_answers_fill_the_buffer_and_calibrate_on_it_alone(server, run, table):
    url, _ = server
    model = EarlyExitModel.from_run(run)
    texts = _texts(run)
    put = httpx.put(url + "/v1/policy", json={"max_risk": 0.2})
    assert put.status_code == 200
    policy = policies.make_policy("pcee", 3, 2, **put.json()["active"]["certificate"]["params"])
    have, need = httpx.get(url + "/v1/policy").json()["shadow"]["inputs"], risk.min_inputs(0.2, 0.1 / 2)
    assert have < need  # pcee: one sequence per patience (2 for 3 layers)
    r = httpx.post(url + "/v1/calibrate")  # too few shadowed yet: says how many it needs
    assert r.status_code == 409 and f"holds {have} inputs" in r.json()["error"], r.text
    assert f"at least {need}" in r.json()["error"]
    before = _metrics(url)
    _classify(url, texts[:30])
    recent = texts[30: 30 + BUFFER]
    got = _classify(url, recent)  # one request after the others: exactly the buffer's inputs

    # the answers are the policy's, as if nothing were shadowed
    rows, types = model.tokenizer.encode(recent)
    layers, logits = runners.exit_batch(model, policy, model.tokenizer.pad(rows, types), len(rows))
    assert [r["exit_layer"] for r in got] == layers.tolist()
    assert [r["label_id"] for r in got] == np.argmax(logits, -1).tolist()

    m = _metrics(url)
    assert m[("jaxexit_shadow_inputs_total", ())] - before.get(("jaxexit_shadow_inputs_total", ()), 0) == 30 + BUFFER
    assert m[("jaxexit_shadow_buffer_inputs", ())] == BUFFER
    task = glue.get_task("sst2")
    examples = glue.load_examples(task, "validation", RunDir(run).train_config()["data_dir"])[30: 30 + BUFFER]
    ramps = runners.cached_logits(model, batches.encode_examples(model.tokenizer, task, examples))
    full = offline.ramp_predictions(ramps)[-1]
    served = np.array([r["label_id"] for r in got])
    assert m[("jaxexit_shadow_consistency_risk", ())] == pytest.approx(np.mean(served != full))
    shadow = httpx.get(url + "/v1/policy").json()["shadow"]
    assert shadow == {"rate": 1.0, "capacity": BUFFER, "inputs": BUFFER,
                      "realised_consistency_risk": pytest.approx(np.mean(served != full))}

    r = httpx.post(url + "/v1/calibrate")
    assert r.status_code == 200, r.text
    active = r.json()["active"]
    cert = active["certificate"]
    assert cert["n"] == BUFFER != table.size and cert["calibrated_on"] == f"shadow buffer ({BUFFER} inputs)"
    want = risk.certify("pcee", ramps, max_risk=0.2, delta=0.1)
    assert cert["params"] == want.params and cert["certified"] == want.certified
    assert httpx.get(url + "/v1/policy").json()["active"] == active
    m = _metrics(url)
    assert m[("jaxexit_risk_bound", ())] == pytest.approx(cert["bound"])
    assert m[("jaxexit_policy_changes_total", (("source", "calibrate"),))] == 1
    assert m[("jaxexit_compiles_after_warmup_total", ())] == 0  # shadowed batches compile nothing new


def test_bad_flags_end_with_one_error_line(capsys):
    for argv, words in ((["--shadow-rate", "1.5"], "--shadow-rate"), (["--shadow-buffer", "0"], "--shadow-buffer"),
                        (["--max-risk", "1"], "--max-risk must be"), (["--max-risk", "0.1", "--risk-delta", "0"],
                                                                       "--risk-delta"),
                        (["--max-risk", "0.1", "--target-saving", "0.2"], "not both"),
                        (["--max-risk", "0.1", "--latency-slo-ms", "100"], "--latency-slo-ms"),
                        (["--max-risk", "0.1", "--no-table"], "--no-table"),
                        (["--risk", "drop"], "go with --max-risk")):
        with pytest.raises(SystemExit) as e:
            serve_cli.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv


# ---- in-process --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(run, table):
    s = Service(EarlyExitModel.from_run(run), glue.get_task("sst2"), table, max_batch=4, max_wait_s=0.01,
                shadow_rate=0.5, shadow_buffer=100)
    yield s
    s.close()


def test_a_shadowed_input_gets_its_unshadowed_answer(service, run):
    model, texts = service.model, _texts(run)[:9]
    rows, types = model.tokenizer.encode(texts)
    tau = float(np.median(policies.normalized_entropy(offline.parts(service.table.outputs)[0][0])))
    for label in ("pcee", "pcee+ensemble"):
        policy = policies.make_policy(label, 3, 2, patience=1, tau=tau)
        plain = service.engine.submit(rows, types, policy).result(60)
        shadow = np.arange(9) % 2 == 0  # a request mixing shadowed and unshadowed inputs
        mixed = service.engine.submit(rows, types, policy, shadow).result(60)
        shadowed = service.engine.submit(rows, types, policy, [True] * 9).result(60)
        assert len(set(plain[0].tolist())) >= 2  # the setting exits at more than one layer
        for layers, outputs in (mixed, shadowed):
            assert layers.tolist() == plain[0].tolist()
            assert np.argmax(outputs, -1).tolist() == np.argmax(plain[1], -1).tolist()
            np.testing.assert_allclose(outputs, plain[1], rtol=1e-5, atol=1e-5)


def test_calibrate_uses_the_shadow_buffer_only(service):
    service.set_policy({"max_risk": 0.2})
    on_dev = service.active.certificate
    assert on_dev.n == service.table.size and service.active.certified_on == service.table.source

    def fill(agree: bool):  # 100 inputs, every ramp confident, served at ramp 1; ramp 3 agrees with 1-2 or not
        logits = np.zeros((3, 100, 2), np.float32)
        logits[:2, :, 0] = 8.0
        logits[2, :, 0 if agree else 1] = 8.0
        service._on_shadow(service.active.policy, logits, np.ones(100, np.int64), logits[0])

    def gauge(name):
        return service.metrics.registry.get_sample_value(name)

    served_before = gauge("jaxexit_shadow_inputs_total")
    differed_before = gauge("jaxexit_shadow_disagreements_total")
    fill(agree=True)
    assert gauge("jaxexit_shadow_consistency_risk") == 0.0 and gauge("jaxexit_shadow_buffer_inputs") == 100
    agreeing = service.calibrate()
    assert agreeing.certificate.n == len(service.shadow) == 100 and agreeing.source == "calibrate"
    assert agreeing.certificate.certified and agreeing.certificate.saving == pytest.approx(2 / 3)  # all exit at 1
    fill(agree=False)  # the buffer keeps the 100 latest: every earlier exit is now a risk event
    assert gauge("jaxexit_shadow_consistency_risk") == 1.0
    assert gauge("jaxexit_shadow_disagreements_total") - differed_before == 100
    assert gauge("jaxexit_shadow_inputs_total") - served_before == 200
    disagreeing = service.calibrate()
    assert disagreeing.certificate.n == 100 and disagreeing.certificate.saving == 0.0
    assert disagreeing.policy != agreeing.policy
    layers, _ = policies.simulate(disagreeing.policy, service.shadow.outputs())
    assert (layers == 3).all()
    assert service.describe_policy()["active"]["certificate"]["calibrated_on"] == "shadow buffer (100 inputs)"
    service.set_policy({"max_risk": 0.01})  # needs 299 inputs at delta 0.1 / 2
    with pytest.raises(RequestError, match="holds 100 inputs.*at least 299") as e:
        service.calibrate()
    assert e.value.status == 409


def test_shadow_buffer_draws_keeps_the_latest_and_counts_disagreements():
    assert ShadowBuffer(0.0).choose(10) is None and ShadowBuffer(1.0).choose(3).tolist() == [True] * 3
    a, b = ShadowBuffer(0.3, seed=7), ShadowBuffer(0.3, seed=7)
    draws = np.concatenate([a.choose(1000) for _ in range(3)])
    assert np.array_equal(draws, np.concatenate([b.choose(1000) for _ in range(3)]))  # seeded
    assert 0.25 < draws.mean() < 0.35
    buffer = ShadowBuffer(1.0, capacity=4)
    assert buffer.consistency() is None
    logits = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2)
    buffer.add(logits, np.array([True, True, False, False, True, False]))
    assert len(buffer) == 4 and buffer.consistency() == 0.25  # the last four: F F T F
    np.testing.assert_array_equal(buffer.outputs(), logits[:, 2:])
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="shadow rate"):
            ShadowBuffer(bad)
    with pytest.raises(ValueError, match="at least|>= 1"):
        ShadowBuffer(0.5, capacity=0)
