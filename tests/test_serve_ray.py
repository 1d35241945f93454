"""jaxexit-serve --ray: two model replicas on Ray Serve (a local Ray on loopback) behind one address.

They answer like the single-process service; a PUT /v1/policy on either reaches both before it
returns; a replica killed (SIGKILL) under load is replaced, with its policy, and no request gets a
5xx or is dropped. The Serve config the CLI writes is one `serve deploy` reads.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")

import tiny  # noqa: E402
from conftest import REPO  # noqa: E402
from jaxexit.cli import serve as serve_cli  # noqa: E402
from jaxexit.serving.service import build_service  # noqa: E402
from jaxexit.text import glue  # noqa: E402
from jaxexit.text.train_config import TrainConfig  # noqa: E402
from jaxexit.text.trainer import finetune  # noqa: E402
from jaxexit.training.checkpoint import RunDir  # noqa: E402

START = ["--target-saving", "0.25"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    model, data = tiny.make_tiny_checkpoint(root / "model"), tiny.make_tiny_glue(root / "glue", dev=48)
    cfg = TrainConfig(task="sst2", model=str(model), data_dir=str(data / "SST-2"), scheme="joint", batch_size=8,
                      max_length=32, lr=1e-3, epochs=1.0, seed=1, ramp_input="mean",
                      output_dir=str(root / "runs"), run_name="sst2")
    return finetune(cfg, progress=False).path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(run):
    """infer/serve.py --ray --replicas 2 on `run` in a subprocess: (URL, its log)."""
    port = _free_port()
    log_path = run / f"ray-{port}.log"
    log = open(log_path, "w")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([sys.executable, str(REPO / "infer" / "serve.py"), "--ray", "--replicas", "2",
                             "--replica-cpus", "0.5", "--checkpoint", str(run), "--port", str(port),
                             "--max-batch", "4", *START], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve.py --ray exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"serve.py --ray did not answer in 400 s:\n{log_path.read_text()[-5000:]}")
            time.sleep(0.5)
        yield url, lambda: log_path.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _texts(run) -> list[str]:
    examples = glue.load_examples(glue.get_task("sst2"), "validation", RunDir(run).train_config()["data_dir"])
    return [ex.text_a for ex in examples]


def _replicas_seen(url: str, path: str = "/healthz", tries: int = 40) -> dict[str, str]:
    """Replica id -> pid over `tries` requests (the ingress spreads them)."""
    seen = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(tries):
            r = client.get(url + path)
            seen[r.headers["x-jaxexit-replica"]] = r.headers["x-jaxexit-replica-pid"]
    return seen


def test_two_replicas_answer_like_one_process(ray_server, run):
    url, output = ray_server
    texts = _texts(run)[:24]
    local = build_service(str(run), start={"target_saving": 0.25}, max_batch=4, compile_cache=False, engine="layer")
    try:
        expected = [local.answer(*_submit_wait(local, [t])) for t in texts]
    finally:
        local.close()
    replicas = collections.Counter()
    with httpx.Client(timeout=60) as client:
        for text, want in zip(texts, expected):
            r = client.post(url + "/v1/classify", json={"texts": [text]})
            assert r.status_code == 200, r.text
            replicas[r.headers["x-jaxexit-replica"]] += 1
            got, ref = r.json()["results"][0], want["results"][0]
            assert (got["label"], got["exit_layer"]) == (ref["label"], ref["exit_layer"]), text
            np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-5)
            assert r.json()["policy"]["target_saving"] == 0.25
    assert len(_replicas_seen(url)) == 2, f"one replica answered everything: {replicas}\n{output()[-3000:]}"
    assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "jaxexit"  # the same app, every endpoint


def _submit_wait(service, texts):
    future, active, arrived, _ = service.submit(texts)
    layers, outputs = future.result(60)
    return active, layers, outputs, arrived


def test_policy_change_reaches_every_replica_before_it_returns(ray_server):
    url, _ = ray_server
    r = httpx.put(url + "/v1/policy", json={"policy": "pcee", "patience": 1, "tau": 0.9}, timeout=150)
    assert r.status_code == 200, r.text
    assert r.json()["active"]["policy"] == "pcee" and r.json()["active"]["tau"] == 0.9
    states = collections.defaultdict(set)
    with httpx.Client(timeout=30) as client:
        for _ in range(40):
            g = client.get(url + "/v1/policy")
            states[g.headers["x-jaxexit-replica"]].add((g.json()["active"]["policy"], g.json()["active"]["tau"]))
    assert len(states) == 2 and all(s == {("pcee", 0.9)} for s in states.values()), dict(states)
    bad = httpx.put(url + "/v1/policy", json={"policy": "pcee", "tau": 7}, timeout=60)  # refused: nothing changes
    assert bad.status_code == 422 and "tau" in bad.json()["error"]
    assert httpx.get(url + "/v1/policy").json()["active"]["tau"] == 0.9
    assert httpx.post(url + "/v1/calibrate").status_code == 409


def test_killed_replica_is_replaced_and_no_request_is_lost(ray_server, run):
    url, output = ray_server
    spec = {"policy": "pcee", "patience": 2, "tau": 0.5}
    assert httpx.put(url + "/v1/policy", json=spec, timeout=150).status_code == 200
    before = _replicas_seen(url)
    assert len(before) == 2
    texts = _texts(run)
    statuses, retried, failures, stop = collections.Counter(), collections.Counter(), [], threading.Event()

    def client_loop(i):  # requests of 24 inputs (6 batches each): both replicas always have some in flight
        with httpx.Client(timeout=120) as client:
            n = i
            while not stop.is_set():
                try:
                    r = client.post(url + "/v1/classify", json={"texts": [texts[(n + j) % len(texts)] for j in range(24)]})
                    statuses[r.status_code] += 1
                    retried[r.headers.get("x-jaxexit-attempts", "1")] += 1
                    if r.status_code != 200:
                        failures.append(r.text)
                except httpx.HTTPError as e:  # a dropped connection is a lost request too
                    failures.append(repr(e))
                n += 7

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        victim, pid = next(iter(before.items()))
        os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 300
        while True:  # until a new replica answers beside the survivor
            now = _replicas_seen(url, tries=10)
            if victim not in now and len(set(now) - set(before)) >= 1 and len(now) == 2:
                break
            assert time.monotonic() < deadline, f"no replacement in 300 s: {now}\n{output()[-3000:]}"
            time.sleep(1)
        time.sleep(2)  # load on the replacement too
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not failures, f"{len(failures)} lost: {failures[:3]}"
    assert statuses[200] > 20, statuses
    # Whether a request was in flight on the victim when it died is timing: when one was, the
    # ingress answered it from the survivor (X-Jaxexit-Attempts > 1), which `failures` above checks.
    print(f"answers by attempts: {dict(retried)}")
    fresh = set(now) - set(before)
    seen = {}
    with httpx.Client(timeout=30) as client:
        for _ in range(40):
            g = client.get(url + "/v1/policy")
            seen[g.headers["x-jaxexit-replica"]] = g.json()["active"]
    for replica in fresh & set(seen):
        assert (seen[replica]["policy"], seen[replica]["patience"], seen[replica]["tau"]) == ("pcee", 2, 0.5)
    assert fresh & set(seen), "the replacement never answered GET /v1/policy"


def test_serve_config_is_one_serve_deploy_reads(run, tmp_path):
    from ray.serve.schema import ServeDeploySchema
    import yaml

    path = tmp_path / "serve.yaml"
    serve_cli.main(["--ray", "--checkpoint", str(run), "--autoscale", "1:3", "--patience", "2", "--tau", "0.3",
                    "--write-serve-config", str(path)])
    config = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "jaxexit.serving.ray_serve:app" and app.args["checkpoint"] == str(run.resolve())
    model = next(d for d in app.deployments if d.name == "Model")
    assert model.autoscaling_config["min_replicas"] == 1 and model.autoscaling_config["max_replicas"] == 3
    assert model.user_config["policy"] == {"policy": "pcee", "patience": 2, "tau": 0.3}


@pytest.mark.parametrize("flags, message", [
    (["--ray", "--shadow-rate", "0.1"], "--shadow-rate is not available with --ray"),
    (["--ray", "--latency-slo-ms", "100", "--target-saving", "0.2"], "--latency-slo-ms is not available"),
    (["--ray", "--replicas", "0"], "--replicas must be >= 1"),
    (["--ray", "--autoscale", "3:1"], "--autoscale takes MIN:MAX"),
    (["--replicas", "2"], "go with --ray"),
])
def test_ray_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        serve_cli.main(flags)
    assert message in capsys.readouterr().err
