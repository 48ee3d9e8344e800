"""Versions switched while serving: the management API, following an MLflow alias, draining.

Real servers on loopback; under steady load from client threads every answer must succeed and
come, as its X-Model-Version header says and its body shows, from the old or the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import shutil
import socket
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from conftest import jpeg_bytes, make_onnx_version

from serving import Predictor
from serving.errors import ModelNotFound
from serving.follow import alias_target, parse_duration
from serving.http.config import ServerConfig
from serving.http.dataplane import VERSION_HEADER, DataPlane
from serving.launch import Launched, start_onnx_server

pytestmark = pytest.mark.integration

IMAGES = [jpeg_bytes(64, 48, seed=s) for s in range(4)]


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Path, Path]:
    """food v1 and v2 (different weights) in one model directory, each with model.onnx."""
    root = tmp_path_factory.mktemp("reload_artifacts")
    return make_onnx_version(root, seed=0), make_onnx_version(root, seed=1)


@pytest.fixture(scope="module")
def expected(versions) -> dict[str, list[list[dict]]]:
    """Each version's answer to each image, as the in-process Predictor gives it."""
    answers = {}
    for v in versions:
        p = Predictor.load(v)
        answers[p.version] = [[x.to_dict() for x in p.predict(image)] for image in IMAGES]
    assert answers["1"] != answers["2"], "the versions must answer differently"
    return answers


# ---------------------------------------------------------------- load and its record
@dataclass
class Answer:
    image: int
    started: float
    status: int
    version: str | None
    body: str


@dataclass
class Load:
    """Client threads posting images to ``/predictions/<model>`` until stopped."""

    url: str
    threads: int = 4
    answers: list[Answer] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)

    def _client(self, offset: int) -> None:
        with requests.Session() as session:
            i = offset
            while not self.stop_event.is_set():
                image, started = i % len(IMAGES), time.monotonic()
                try:
                    r = session.post(self.url, data=IMAGES[image], timeout=30)
                    answer = Answer(image, started, r.status_code, r.headers.get(VERSION_HEADER),
                                    r.text)
                except requests.RequestException as e:
                    answer = Answer(image, started, 0, None, repr(e))
                self.answers.append(answer)
                i += 1

    @classmethod
    @contextlib.contextmanager
    def running(cls, url: str) -> Iterator[Load]:
        """The load on ``url`` while the block runs."""
        load = cls(url)
        workers = [threading.Thread(target=load._client, args=(n,), daemon=True)
                   for n in range(load.threads)]
        for w in workers:
            w.start()
        try:
            yield load
        finally:
            load.stop_event.set()
            for w in workers:
                w.join(60)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        """Until ``n`` more answers arrived."""
        target, deadline = len(self.answers) + n, time.monotonic() + timeout
        while len(self.answers) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.answers) >= target, f"only {len(self.answers)} answers"

    def check(self, expected: dict[str, list[list[dict]]]) -> dict:
        """Every answer is a 200 whose body is the answer of the version its header names;
        the figures of the run."""
        failed = [a for a in self.answers if a.status != 200]
        assert not failed, f"{len(failed)} failed requests, first: {failed[0]}"
        for a in self.answers:
            assert a.version in expected, a
            want = expected[a.version][a.image]
            got = json.loads(a.body)
            assert [g["label"] for g in got] == [w["label"] for w in want], (a, want)
            assert [g["probability"] for g in got] == pytest.approx(
                [w["probability"] for w in want], abs=1e-5), (a, want)
        return {"requests": len(self.answers), "failures": len(failed),
                "versions": dict(Counter(a.version for a in self.answers))}


def assert_client_error(response: requests.Response, status: int) -> str:
    """A TorchServe-shaped 4xx JSON error; its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and body["type"] and body["message"]
    return body["message"]


def described(server: Launched, name: str = "food") -> dict[str, bool]:
    """Version -> is default, from the management API."""
    r = requests.get(f"{server.management_url}/models/{name}/all", timeout=10)
    r.raise_for_status()
    return {d["modelVersion"]: d["isDefault"] for d in r.json()}


# ---------------------------------------------------------------- management API
@pytest.fixture(scope="module")
def server(versions, tmp_path_factory):
    """v1 served; its directory (holding v2 too) is where registration may load from."""
    log = tmp_path_factory.mktemp("reload_logs") / "server.log"
    with start_onnx_server([str(versions[0])], log) as s:
        yield s


def test_registration_refuses_urls_dotdot_symlinks_out_and_outside_paths(
        server, versions, tmp_path):
    v1, v2 = versions
    models = versions[0].parent
    outside = tmp_path / "outside"
    shutil.copytree(v2, outside / "v2")
    (models / "linked").symlink_to(outside / "v2")  # a symlink leading out
    leaky = models / "v7"  # a version directory whose config links out
    leaky.mkdir()
    for f in v2.iterdir():
        (leaky / f.name).symlink_to(outside / "v2" / f.name)
    url = f"{server.management_url}/models"
    try:
        cases = [({"url": "http://example.com/food.mar"}, 400, "URL"),
                 ({"url": "file:///etc/passwd"}, 400, "URL"),
                 ({"url": "models:/food-classifier@champion"}, 400, "URL"),
                 ({"url": "../food/v2"}, 400, "'..'"),
                 ({"url": f"{models}/../{models.name}/v2"}, 400, "'..'"),
                 ({"url": "linked"}, 403, "outside the allowed"),
                 ({"url": "v7"}, 403, "links to"),
                 ({"url": str(outside / "v2")}, 403, "outside the allowed"),
                 ({"url": "/etc"}, 403, "outside the allowed"),
                 ({"url": "v9"}, 404, "no such version"),
                 ({}, 400, "url is required"),
                 ({"url": str(v1)}, 409, "already registered"),
                 ({"url": "v2", "model_name": "a/b"}, 400, "model_name")]
        for params, status, words in cases:
            message = assert_client_error(requests.post(url, params=params, timeout=30), status)
            assert words in message, (params, message)
    finally:
        shutil.rmtree(leaky)
        (models / "linked").unlink()
    assert described(server) == {"1": True}
    # unregistering the last (default) version, unknown versions and foreign hosts
    assert "last version" in assert_client_error(
        requests.delete(f"{url}/food/1", timeout=10), 409)
    assert_client_error(requests.delete(f"{url}/food/5", timeout=10), 404)
    assert_client_error(requests.put(f"{url}/food/5/set-default", timeout=10), 404)
    assert_client_error(requests.get(url, headers={"Host": "evil.example"}, timeout=10), 403)
    # a bad image still says which version refused it
    r = requests.post(f"{server.url}/predictions/food", data=b"not an image", timeout=10)
    assert r.status_code == 400 and r.headers[VERSION_HEADER] == "1"


def test_switch_under_load_through_the_management_api(server, versions, expected):
    m = f"{server.management_url}/models"
    with Load.running(f"{server.url}/predictions/food") as load:
        load.wait_for(100)
        r = requests.post(m, params={"url": str(versions[1])}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"status": 'Model "food" Version: 2 registered with 1 initial workers'}
        assert described(server) == {"1": True, "2": False}  # registered, not yet default
        load.wait_for(100)
        r = requests.put(f"{m}/food/2/set-default", timeout=10)
        assert r.status_code == 200, r.text
        switched = time.monotonic()
        load.wait_for(100)
        r = requests.delete(f"{m}/food/1", timeout=60)
        assert r.status_code == 200 and "unregistered" in r.json()["status"], r.text
        load.wait_for(100)
    figures = load.check(expected)
    after = [a.version for a in load.answers if a.started > switched]
    assert after and set(after) == {"2"}
    assert set(figures["versions"]) == {"1", "2"}
    assert described(server) == {"2": True}
    print(f"\nmanagement API switch under load: {figures}")


# ---------------------------------------------------------------- following an alias
def registry_with(versions: dict[str, Path], tmp_path: Path):
    """A SQLite MLflow registry holding each version directory as a version of
    ``food-classifier``, logged the way training does (the run's ``version/`` artifacts)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("reload", artifact_location=str(tmp_path / "mlruns"))
    client.create_registered_model("food-classifier")
    numbers = {}
    for label, version_dir in versions.items():
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(version_dir), "version")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version("food-classifier", f"{run.info.artifact_uri}/version",
                                         run_id=run.info.run_id)
        numbers[label] = mv.version
    return uri, client, numbers


def test_follow_switches_when_the_alias_moves_and_survives_a_broken_version(
        versions, expected, tmp_path):
    v1, v2 = versions
    broken = tmp_path / "broken"
    shutil.copytree(v1, broken)
    (broken / "model.onnx").unlink()
    uri, client, numbers = registry_with({"v1": v1, "v2": v2, "broken": broken}, tmp_path)
    client.set_registered_model_alias("food-classifier", "champion", numbers["v1"])
    interval = 1.0
    with start_onnx_server(["models:/food-classifier@champion"], tmp_path / "server.log",
                           extra_args=["--follow", f"{interval}s"],
                           env={"MLFLOW_TRACKING_URI": uri}) as server, \
            Load.running(f"{server.url}/predictions/food") as load:
        load.wait_for(20)
        # a version that cannot load: logged, retried, v1 keeps serving
        client.set_registered_model_alias("food-classifier", "champion", numbers["broken"])
        deadline = time.monotonic() + 30
        while server.log_path.read_text().count("keeps serving") < 2:
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.1)
        assert described(server) == {"1": True}
        moved = time.monotonic()
        client.set_registered_model_alias("food-classifier", "champion", numbers["v2"])
        deadline = time.monotonic() + 60
        while not any(a.version == "2" for a in load.answers[-8:]):
            assert time.monotonic() < deadline, server.log_path.read_text()[-3000:]
            time.sleep(0.05)
        switch_s = time.monotonic() - moved
        load.wait_for(100)
        while described(server) != {"2": True}:  # v1 drained and unloaded
            assert time.monotonic() < deadline, described(server)
            time.sleep(0.05)
        settled = time.monotonic()
        load.wait_for(100)
    figures = load.check(expected)
    assert set(figures["versions"]) == {"1", "2"}
    assert {a.version for a in load.answers if a.started > settled} == {"2"}
    print(f"\n--follow {interval}s switch under load: {figures}, first v2 answer "
          f"{switch_s:.1f}s after the alias moved")


def test_follow_needs_an_alias_and_a_duration(versions, capsys):
    from serving.__main__ import build_parser, main

    assert main(["--model", str(versions[0]), "--follow", "30s",
                 "--management-port", "0", "--metrics-port", "0"]) == 2
    assert "--follow needs a --model models:/<name>@<alias>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--follow", "soon"])
    assert "'soon' is not a positive duration" in capsys.readouterr().err
    args = build_parser().parse_args(["--model", "m"])
    assert (args.management_port, args.management_host, args.follow) == (8081, "127.0.0.1",
                                                                          None)


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("2m", 120), ("1h", 3600),
                                          ("500ms", 0.5), ("45", 45), ("1.5m", 90),
                                          (" 10 s ", 10)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "0", "0s", "-5s", "10x", "5 min", "1e3"])
def test_parse_duration_names_the_bad_value(text):
    with pytest.raises(ValueError, match="not a positive duration"):
        parse_duration(text)


def test_alias_target():
    t = alias_target("models:/food-classifier@champion", "food")
    assert (t.model, t.alias, t.name) == ("food-classifier", "champion", "food")
    assert t.version_uri("3") == "models:/food-classifier/3"
    assert alias_target("models:/food-classifier/3") is None
    assert alias_target("artifacts/food/latest") is None


def test_management_port_in_use_is_a_clear_start_error(versions, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot listen on 127.0.0.1"):
            start_onnx_server([str(versions[0])], tmp_path / "server.log",
                              extra_args=["--management-port", str(port)], ready_timeout=60)


# ---------------------------------------------------------------- the data plane itself
def test_removed_version_drains_then_frees_its_session(versions):
    """In process: a removed version takes no new request at once, finishes the admitted
    one, and is garbage once drained."""

    async def scenario() -> weakref.ref:
        plane = DataPlane([Predictor.load(versions[0])], ServerConfig(metrics_port=None))
        plane.start()
        old = weakref.ref(plane.models.get("food").predictor)
        plane.add_version(await plane.load_version(str(versions[1])))
        assert plane.models.get("food").predictor.version == "1"  # added, not default
        with pytest.raises(ValueError, match="default version"):
            plane.models.remove("food", "1")
        plane.models.set_default("food", "2")
        release = asyncio.Event()

        async def slow(entry):
            await release.wait()
            return entry.predictor.version, 1

        in_flight = asyncio.create_task(plane.serve("food", "1", slow, method="POST",
                                                    path="/predictions/food/1"))
        await asyncio.sleep(0.05)
        removal = asyncio.create_task(plane.remove_version("food", "1"))
        await asyncio.sleep(0.1)
        with pytest.raises(ModelNotFound):  # no new request reaches it
            await plane.serve("food", "1", slow, method="POST", path="/predictions/food/1")
        assert not removal.done()  # waits for the admitted one
        release.set()
        assert await in_flight == "1"
        await removal
        await plane.stop()
        return old

    old = asyncio.run(scenario())
    gc.collect()
    assert old() is None
