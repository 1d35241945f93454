"""The service's contract and its admin door (docs/serving.md, "The contract" and "Admin token").

One real server (infer/serve.py on loopback, an untrained tiny SST-2 run, an admin token): its
/openapi.json validates as OpenAPI 3.1 and documents every body, status and error; schemathesis, an
API fuzzer nobody here wrote, runs its examples, coverage and fuzzing phases over every operation
and finds no failure and no 5xx, reaching every form of PUT /v1/policy; the token guards what
changes the service and nothing else; bad input the fuzzer may not think of gets a 4xx naming it,
and the service answers the next request. In-process: the token file's errors, and the warning
when the service listens beyond loopback without a token.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import tiny
from conftest import REPO
from jaxexit.cli import serve as serve_cli
from jaxexit.serving import app as app_module
from jaxexit.serving import auth
from jaxexit.serving.service import Service
from jaxexit.text import glue
from jaxexit.text.model import EarlyExitModel
from jaxexit.text.train_config import TrainConfig
from jaxexit.training.checkpoint import RunDir
from test_serve import serving

TOKEN = "contract-test-token-7f3a"
OPERATIONS = {("POST", "/v1/classify"), ("GET", "/v1/policy"), ("PUT", "/v1/policy"), ("POST", "/v1/calibrate"),
              ("GET", "/healthz"), ("GET", "/metrics")}
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An SST-2 run of a tiny random model, untrained (a contract needs a run, not a good one):
    written as train/finetune.py writes one, 48 labelled dev inputs for the calibration table."""
    root = tmp_path_factory.mktemp("contract")
    checkpoint, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", train=8, dev=48)
    cfg = TrainConfig(task="sst2", model=str(checkpoint), data_dir=str(data / "SST-2"), scheme="joint",
                      max_length=32, seed=1, ramp_input="mean", output_dir=str(root / "runs"), run_name="sst2")
    model = EarlyExitModel.from_pretrained(checkpoint, num_labels=2, ramp_input="mean", max_length=32, seed=1)
    rd = RunDir.create(cfg.output_dir, cfg.run_name, cfg.to_dict(), model.config, model.tokenizer)
    rd.save_model(model.params, {"task": "sst2", "scheme": "joint", "note": "untrained (tests/test_serve_contract.py)"})
    return rd.path


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("token") / "admin-token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(run, token_file):
    with serving(run, "--max-batch", "1", "--target-saving", "0", "--admin-token-file", str(token_file)) as s:
        yield s


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def _ok_next(url: str) -> None:
    r = httpx.post(url + "/v1/classify", json={"texts": ["a good film"]})
    assert r.status_code == 200, r.text


# ---- the schema ------------------------------------------------------------------------------------------
def test_openapi_validates_and_documents_every_body_status_and_error(server):
    schemathesis = pytest.importorskip("schemathesis", reason="pip install -r requirements-test.txt")
    url, _ = server
    doc = httpx.get(url + "/openapi.json").json()
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    assert doc["openapi"].startswith("3.1")
    ops = {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}
    assert set(ops) == OPERATIONS
    schemas = doc["components"]["schemas"]
    for key in (("POST", "/v1/classify"), ("PUT", "/v1/policy")):
        assert ops[key]["requestBody"]["required"] and "application/json" in ops[key]["requestBody"]["content"]
    classify = schemas["ClassifyRequest"]
    assert set(classify["properties"]) == {"texts"} and classify["additionalProperties"] is False  # SST-2: texts
    texts = classify["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["minLength"]) == (1, 256, 1)
    forms = collections.Counter(ref["$ref"].split("/")[-1].split("Pcee")[0] for ref in schemas["PolicyChange"]["anyOf"]
                                if "Pcee" in ref["$ref"])
    assert forms == {"Explicit": 3, "Target": 3, "Risk": 6}  # 3 spellings; a risk target leaves patience or tau open
    for (method, path), op in ops.items():
        statuses = set(op["responses"])
        assert "200" in statuses, (method, path)
        for status in statuses - {"200"}:
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"401", "403", "409", "413", "415", "422"} <= set(ops[("PUT", "/v1/policy")]["responses"])
    assert {"413", "415", "422", "503"} <= set(ops[("POST", "/v1/classify")]["responses"])
    assert {"401", "403", "409"} <= set(ops[("POST", "/v1/calibrate")]["responses"])
    guarded = {k for k, op in ops.items() if op.get("security")}
    assert guarded == {("PUT", "/v1/policy"), ("POST", "/v1/calibrate")}
    assert list(ops[("GET", "/metrics")]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")

    options = httpx.options(url + "/v1/policy")
    assert options.status_code == 204 and options.headers["allow"] == "GET, PUT, OPTIONS"
    wrong = httpx.delete(url + "/v1/policy")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, PUT, OPTIONS"
    assert "DELETE is not allowed" in wrong.json()["error"]
    assert httpx.get(url + "/v1/classify").headers["allow"] == "POST, OPTIONS"
    missing = httpx.get(url + "/v2/classify")
    assert missing.status_code == 404 and "no endpoint /v2/classify" in missing.json()["error"]


def test_schemathesis_finds_no_failure_and_no_server_error(server, tmp_path):
    """The fuzzer's examples, coverage and fuzzing phases over every operation (coverage: every
    boundary and type of every field of every form; fuzzing: 25 cases per operation)."""
    if not SCHEMATHESIS.is_file():
        pytest.skip("schemathesis is not installed (pip install -r requirements-test.txt)")
    url, _ = server
    har = tmp_path / "schemathesis.har"
    cmd = [str(SCHEMATHESIS), "--config-file", str(REPO / "tests" / "schemathesis.toml"), "--no-color", "run",
           url + "/openapi.json", "--phases", "examples,coverage,fuzzing", "--checks", "all", "--max-examples", "25",
           "--seed", "1", "--workers", "1", "--generation-database", "none", "-H", f"Authorization: Bearer {TOKEN}",
           "--report", "har", "--report-har-path", str(har)]
    began = time.monotonic()
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - began
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    for phase in ("Examples", "Coverage", "Fuzzing"):
        assert re.search(rf"✅\s+{phase}\b", out), (phase, out[-3000:])
    assert "No issues found" in out

    answers = collections.defaultdict(collections.Counter)  # (method, path) -> status -> count
    forms = collections.Counter()
    for entry in json.loads(har.read_text())["log"]["entries"]:
        method, path = entry["request"]["method"], httpx.URL(entry["request"]["url"]).path
        status = entry["response"]["status"]
        answers[(method, path)][status] += 1
        if (method, path) == ("PUT", "/v1/policy") and status == 200:
            body = json.loads(entry["request"]["postData"]["text"])
            forms["target" if body.get("target_saving") is not None else
                  "risk" if body.get("max_risk") is not None else "explicit"] += 1
    server_errors = {k: {s: n for s, n in c.items() if s >= 500} for k, c in answers.items()}
    assert not any(server_errors.values()), server_errors
    assert OPERATIONS <= set(answers)
    for op in OPERATIONS - {("POST", "/v1/calibrate")}:  # no risk target and no shadow traffic: 409 there
        assert answers[op][200] > 0, (op, answers[op])
    assert set(answers[("POST", "/v1/calibrate")]) >= {401, 409}
    assert min(forms[f] for f in ("explicit", "target", "risk")) >= 10, forms  # every form reached
    print(f"schemathesis: {sum(sum(c.values()) for c in answers.values())} requests in {took:.0f} s; "
          f"PUT /v1/policy accepted: {dict(forms)}")


# ---- the admin token -------------------------------------------------------------------------------------
def test_the_token_guards_policy_changes_and_nothing_else(server):
    url, output = server
    before = httpx.get(url + "/v1/policy").json()["active"]
    change = {"policy": "static", "k": 2}
    r = httpx.put(url + "/v1/policy", json=change)
    assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    for header in ("Basic " + TOKEN, "Bearer", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x", TOKEN):
        r = httpx.put(url + "/v1/policy", json=change, headers={"Authorization": header})
        assert r.status_code in (401, 403), (header, r.status_code)
        assert r.status_code == (403 if header.startswith("Bearer ") else 401), header
    assert httpx.get(url + "/v1/policy").json()["active"] == before  # refused: nothing changed
    r = httpx.put(url + "/v1/policy", json=change, headers=ADMIN)
    assert r.status_code == 200 and r.json()["active"]["k"] == 2
    r = httpx.post(url + "/v1/calibrate")
    assert r.status_code == 401
    assert httpx.post(url + "/v1/calibrate", headers={"Authorization": "Bearer wrong"}).status_code == 403
    r = httpx.post(url + "/v1/calibrate", headers=ADMIN)  # let in; no risk target is active
    assert r.status_code == 409 and "not a risk target" in r.json()["error"]
    answer = httpx.post(url + "/v1/classify", json={"texts": ["a good film"]})  # no token needed
    assert answer.status_code == 200 and {x["exit_layer"] for x in answer.json()["results"]} == {2}
    for path in ("/v1/policy", "/healthz", "/metrics", "/openapi.json"):
        assert httpx.get(url + path).status_code == 200, path
    assert TOKEN not in output()  # never logged
    assert "policy changes need the admin token" in output()


def test_a_bad_token_file_is_a_startup_error(run, tmp_path, capsys, monkeypatch):
    empty, spaced = tmp_path / "empty", tmp_path / "spaced"
    empty.write_text("\n  \n")
    spaced.write_text("two words\n")
    monkeypatch.delenv(auth.TOKEN_FILE_ENV, raising=False)
    for flags, words in ((["--admin-token-file", str(tmp_path / "nope")], "does not exist"),
                         (["--admin-token-file", str(empty)], "is empty"),
                         (["--admin-token-file", str(spaced)], "printable ASCII")):
        with pytest.raises(SystemExit) as e:
            serve_cli.main(["--checkpoint", str(run), *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and str(tmp_path) in err, (flags, err)
    monkeypatch.setenv(auth.TOKEN_FILE_ENV, str(tmp_path / "from-env"))  # the variable names the file
    with pytest.raises(SystemExit):
        serve_cli.main(["--checkpoint", str(run)])
    assert "from-env does not exist" in capsys.readouterr().err
    good = tmp_path / "good"
    good.write_text(" tok-123 \n")
    good.chmod(0o600)
    args = serve_cli.build_parser().parse_args(["--admin-token-file", str(good)])
    assert serve_cli.admin_token(args, {auth.TOKEN_FILE_ENV: str(empty)}) == "tok-123"  # the flag wins
    args = serve_cli.build_parser().parse_args([])
    assert serve_cli.admin_token(args, {auth.TOKEN_FILE_ENV: str(good)}) == "tok-123"
    assert serve_cli.admin_token(args, {}) is None


def test_listening_beyond_loopback_without_a_token_warns(run, monkeypatch, caplog):
    model = EarlyExitModel.from_run(run)
    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append((app, kw)))
    for host, token, warned in (("0.0.0.0", None, True), ("192.168.1.20", None, True), ("0.0.0.0", "t", False),
                                ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)):
        service = Service(model, glue.get_task("sst2"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="jaxexit.serving.auth"):
            app_module.serve(service, host=host, port=8123, admin_token=token)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert ("PUT /v1/policy" in said) == warned, (host, token, said)
        assert calls[-1][1]["host"] == host
    assert auth.is_loopback("127.0.0.2") and not auth.is_loopback("example.com")


def test_a_failed_batch_or_a_closed_engine_is_a_503_and_a_bug_a_500_with_a_json_body(run, monkeypatch):
    from fastapi.testclient import TestClient

    service = Service(EarlyExitModel.from_run(run), glue.get_task("sst2"))
    client = TestClient(app_module.create_app(service), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("the device went away")

    monkeypatch.setattr(service.engine, "run", broken)
    r = client.post("/v1/classify", json={"texts": ["a good film"]})
    assert r.status_code == 503 and "could not run" in r.json()["error"] and "went away" in r.json()["error"]
    monkeypatch.setattr(service, "describe_policy", lambda: 1 / 0)
    r = client.get("/v1/policy")
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]
    service.close()
    r = client.post("/v1/classify", json={"texts": ["a good film"]})
    assert r.status_code == 503 and "not taking requests" in r.json()["error"]


# ---- bad input -------------------------------------------------------------------------------------------
def test_bad_input_gets_a_4xx_naming_it_and_the_next_request_is_answered(server):
    url, _ = server
    json_type = {"content-type": "application/json"}
    deep = b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = [  # (method, path, request kwargs, status, words in the error)
        ("POST", "/v1/classify", {"content": deep, "headers": json_type}, 422, "recursion limit"),
        ("PUT", "/v1/policy", {"content": b'{"policy": ' * 50_000 + b"1" + b"}" * 50_000, "headers": ADMIN},
         422, "recursion limit"),
        ("POST", "/v1/classify", {"json": {"texts": [""] * 10_000}}, 413, "10000 inputs"),
        ("POST", "/v1/classify", {"json": {"texts": ["a film", ""]}}, 422, "texts[1] is empty"),
        ("POST", "/v1/classify", {"content": b'{"texts": ["\xff\xfe a film"]}', "headers": json_type}, 422, "UTF-8"),
        ("PUT", "/v1/policy", {"content": b'{"policy": "\xffcee"}', "headers": ADMIN}, 422, "UTF-8"),
        ("POST", "/v1/classify", {"content": b'{"texts": ["a film"]}', "headers": {"content-type": "text/plain"}},
         415, "Content-Type: application/json"),
        ("POST", "/v1/classify", {"data": {"texts": "a film"}}, 415, "x-www-form-urlencoded"),
        ("PUT", "/v1/policy", {"content": b'{"policy": "static", "k": 3}',
                               "headers": {"content-type": "text/plain", **ADMIN}}, 415, "must be JSON"),
        ("POST", "/v1/classify", {"json": {"texts": ["a film"], "pairs": None}}, 422, "single sentences"),
        ("PUT", "/v1/policy", {"content": b'{"policy": "pcee", "patience": 1, "tau": NaN}', "headers": ADMIN},
         422, "not JSON"),
        ("POST", "/v1/classify", {"content": b"", "headers": json_type}, 422, "JSON"),
    ]
    for method, path, kwargs, status, words in cases:
        r = httpx.request(method, url + path, **kwargs)
        assert r.status_code == status and words in r.json()["error"], (method, path, r.status_code, r.text[:300])
        _ok_next(url)

    long = "a good film " * 3000  # far beyond the model's 32 tokens
    r = httpx.post(url + "/v1/classify", json={"texts": [long, "a good film"]})
    assert r.status_code == 200, r.text
    assert [x["truncated"] for x in r.json()["results"]] == [True, False]
    exactly = " ".join(["good"] * 30)  # 30 words + [CLS] + [SEP]: the model's 32 tokens, nothing cut
    r = httpx.post(url + "/v1/classify", json={"texts": [exactly, exactly + " film"]})
    assert [x["truncated"] for x in r.json()["results"]] == [False, True]

