"""deploy/: the ONNX server image, the Kubernetes and KServe manifests, the Triton repository.

No Docker engine or cluster here, so everything is checked against the real thing that is:
the image's exact CMD and HEALTHCHECK run on loopback ports (with torch made unimportable),
every manifest strictly against the Kubernetes schemas (the raw files and each kustomize
overlay as rendered), ports/probe paths/flags against the running server and its own
parsers, TorchServe settings against TorchServe's own configuration class, the model init
container against a local MLflow registry, and config.pbtxt against Triton's ModelConfig.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import jpeg_bytes, make_onnx_version

from serving.launch import free_port, spawn, stop_process, wait_ready

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
IMAGE_DOCKERFILE = DEPLOY / "onnx-server" / "Dockerfile"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
# Strict schemas of the oldest and a recent Kubernetes release that kubernetes-validate ships.
K8S_VERSIONS = ("1.30", "1.34")
KSERVE_API = "serving.kserve.io/v1beta1"
RETRAIN_REASON = "retrain lands with the lifecycle issue"


# ---- reading the files -------------------------------------------------------------------

def dockerfile_json(path: Path, instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of a Dockerfile's CMD or HEALTHCHECK ... CMD."""
    text = path.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(instruction))
    return json.loads(re.search(r"CMD\s+(\[.*\])", line).group(1))


def manifest_files() -> list[Path]:
    """Every Kubernetes/KServe YAML file in deploy/ (kustomizations are not resources)."""
    return sorted(p for p in DEPLOY.rglob("*.y*ml") if p.name != "kustomization.yaml")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def raw_documents() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(DEPLOY)}#{i}", d) for p in manifest_files()
            for i, d in enumerate(documents(p))]


def render(overlay: str) -> list[dict]:
    """``kubectl kustomize`` of an overlay (kustomize is built into kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("rendering the overlays needs kubectl (it embeds kustomize): "
                    "https://kubernetes.io/docs/tasks/tools/")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def cpu_cores(quantity: str | int) -> int:
    """A CPU quantity as the downward API gives it with divisor 1: rounded up to cores."""
    text = str(quantity)
    value = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    return math.ceil(value)


def expand(container: dict) -> list[str]:
    """The container's command + args with Kubernetes' $(VAR) expansion applied; every
    reference must name a variable the container declares (Kubernetes would leave it as
    literal text)."""
    values = {}
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = env["value"]
        elif env.get("valueFrom", {}).get("resourceFieldRef", {}).get("resource") == \
                "limits.cpu":
            ref = env["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == container["name"] and str(ref["divisor"]) == "1"
            values[env["name"]] = str(cpu_cores(container["resources"]["limits"]["cpu"]))

    def substitute(arg: str) -> str:
        def one_ref(m: re.Match) -> str:
            assert m.group(1) in values, f"$({m.group(1)}) is not a variable of the container"
            return values[m.group(1)]
        return re.sub(r"\$\((\w+)\)", one_ref, arg)

    return [substitute(str(a)) for a in container.get("command", []) + container.get("args",
                                                                                    [])]


def serving_args(container: dict):
    """The container's ``python -m serving`` arguments, parsed by the server's own parser."""
    from serving.__main__ import build_parser

    argv = expand(container)
    assert argv[:3] == ["python", "-m", "serving"], argv
    parser = build_parser()
    assert_exact_flags(parser, argv[3:])
    return parser.parse_args(argv[3:])


def assert_exact_flags(parser, argv: list[str]) -> None:
    """Every ``--flag`` is spelled out (argparse would also take a unique abbreviation)."""
    options = {s for action in parser._actions for s in action.option_strings}
    for arg in argv:
        if arg.startswith("--"):
            assert arg.partition("=")[0] in options, f"{arg} is not an option of {parser.prog}"


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


def validate_strict(doc: dict) -> None:
    import kubernetes_validate

    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{where}: {e.message}")


# ---- the server every check runs against: the image's exact CMD --------------------------

@pytest.fixture(scope="module")
def onnx_version(tmp_path_factory) -> Path:
    return make_onnx_version(tmp_path_factory.mktemp("deploy_artifacts"))


def with_values(cmd: list[str], values: dict[str, str]) -> list[str]:
    """``cmd`` with the values of some flags replaced (each flag must be there once)."""
    out = list(cmd)
    for flag, value in values.items():
        assert out.count(flag) == 1, f"{flag} not in {cmd}"
        out[out.index(flag) + 1] = value
    return out


@pytest.fixture(scope="module")
def image_server(onnx_version, tmp_path_factory):
    """The Dockerfile's CMD on loopback ports, serving the tiny model as the image would
    (/models/food -> a temp version), with torch and mlflow made unimportable."""
    root = tmp_path_factory.mktemp("image_server")
    for package in ("torch", "torchvision", "mlflow"):
        (root / "blocked" / package).mkdir(parents=True)
        (root / "blocked" / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not in the serving image')\n")
    cmd = dockerfile_json(IMAGE_DOCKERFILE, "CMD")
    assert cmd[:3] == ["python", "-m", "serving"]
    port, metrics_port = free_port(), free_port()
    cmd = with_values(cmd, {"--host": "127.0.0.1", "--port": str(port),
                            "--metrics-port": str(metrics_port),
                            "--model": f"food={onnx_version}"})
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": f"{root / 'blocked'}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    log_path = root / "server.log"
    proc = spawn([sys.executable, *cmd[1:]], log_path, env=env, cwd=REPO)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", proc, 90, log_path)
        yield {"port": port, "metrics_port": metrics_port, "url": f"http://127.0.0.1:{port}",
               "log": log_path, "version": onnx_version}
    finally:
        stop_process(proc, grace=30)


def get(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ---- the image ----------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", ["onnx-server/Dockerfile", "training/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint if hadolint.exists() else "hadolint"),
                          str(DEPLOY / dockerfile)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_installs_the_serve_extra_and_nothing_with_torch():
    import tomllib

    text = IMAGE_DOCKERFILE.read_text().replace("\\\n", " ")
    installs = [ln for ln in text.splitlines() if re.match(r"RUN\s+pip install", ln)]
    assert len(installs) == 1 and "[serve,openvino]" in installs[0] \
        and "torch" not in installs[0]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["serve"]
    assert not [r for r in wanted if re.match(r"(torch|mlflow)\b", r)]
    assert "USER 1000" in text and re.search(r"^EXPOSE 8080 8082$", text, re.MULTILINE)


@pytest.mark.integration
def test_image_cmd_serves_without_torch(image_server, sample_images):
    import urllib.request

    request = urllib.request.Request(f"{image_server['url']}/predictions/food",
                                     data=sample_images[0].read_bytes(), method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as r:
        top = json.load(r)
    assert r.status == 200 and top[0]["label"] in {"pizza", "salad", "sushi"}
    assert get(f"http://127.0.0.1:{image_server['metrics_port']}/metrics") == 200
    assert "is not in the serving image" not in image_server["log"].read_text()


@pytest.mark.integration
def test_image_healthcheck_passes_on_the_server_and_fails_without_one(image_server):
    cmd = dockerfile_json(IMAGE_DOCKERFILE, "HEALTHCHECK")
    assert cmd[0] == "python" and cmd[-1].count(":8080/") == 1

    def run(port: int) -> int:
        script = cmd[-1].replace(":8080/", f":{port}/")
        return subprocess.run([sys.executable, *cmd[1:-1], script], capture_output=True,
                              timeout=30, check=False).returncode

    assert run(image_server["port"]) == 0
    assert run(free_port()) != 0


def test_image_ports_match_the_server_flags():
    from serving.__main__ import build_parser

    args = build_parser().parse_args(dockerfile_json(IMAGE_DOCKERFILE, "CMD")[3:])
    exposed = re.search(r"^EXPOSE (.+)$", IMAGE_DOCKERFILE.read_text(), re.MULTILINE).group(1).split()
    assert {args.port, args.metrics_port} == {int(p) for p in exposed}
    assert args.host == "0.0.0.0"


# ---- every manifest, strictly -------------------------------------------------------------

def kubernetes_documents() -> list:
    """The raw documents Kubernetes has schemas for (KServe's CRDs are checked below)."""
    return [pytest.param(doc, id=where) for where, doc in raw_documents()
            if doc["apiVersion"] != KSERVE_API]


@pytest.mark.parametrize("doc", kubernetes_documents())
def test_manifest_file_validates_strictly(doc):
    validate_strict(doc)


def check_references(docs: list[dict]) -> None:
    """What the rendered objects name exists among them: workloads, ports, config maps,
    claims, selectors."""
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pods = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "CronJob")}
    for d in pods.values():
        spec = pod_spec(d)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for source in c.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        mounts = {m["name"] for c in spec["containers"] + spec.get("initContainers", [])
                  for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in spec.get("volumes", [])}
    for d in docs:
        if d["kind"] == "HorizontalPodAutoscaler":
            assert d["spec"]["scaleTargetRef"]["name"] in pods
        if d["kind"] in ("Service", "PodDisruptionBudget"):
            selector = d["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            targets = [p for p in pods.values() if p["kind"] == "Deployment" and
                       selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()]
            assert len(targets) == 1, f"{d['kind']} {d['metadata']['name']} selects {targets}"
            if d["kind"] == "Service":
                container = pod_spec(targets[0])["containers"][0]
                for port in d["spec"]["ports"]:
                    container_port(container, port["targetPort"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_holds_together(overlay):
    docs = render(overlay)
    for doc in docs:
        validate_strict(doc)
    check_references(docs)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = one(docs, "Deployment")
    for c in pod_spec(deployment)["containers"]:
        assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys()
        assert c["readinessProbe"] and c["livenessProbe"]


# ---- the ONNX server's manifests against the server itself -------------------------------

def onnx_server_containers() -> list[tuple[str, dict, int | None]]:
    """(where, container, terminationGracePeriodSeconds) of every deployment of our server."""
    out = []
    for overlay in ("onnx", "onnx-volume"):
        d = one(render(overlay), "Deployment", "food-onnx-server")
        out.append((overlay, pod_spec(d)["containers"][0],
                    pod_spec(d)["terminationGracePeriodSeconds"]))
    isvc = documents(DEPLOY / "kserve" / "onnx-server-v2.yaml")[0]
    out.append(("kserve", isvc["spec"]["predictor"]["containers"][0], None))
    return out


@pytest.mark.integration
def test_onnx_server_manifests_use_real_flags_ports_and_probe_paths(image_server):
    for where, container, grace in onnx_server_containers():
        args = serving_args(container)  # every flag exists, every $(VAR) resolves
        cpu = cpu_cores(container["resources"]["limits"]["cpu"])
        assert args.threads == cpu and args.preprocess_threads == cpu, where
        assert args.host == "0.0.0.0" and args.timeout_s > 0
        ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
        assert args.port in ports.values(), where
        if "metrics" in ports:
            assert ports["metrics"] == args.metrics_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in container:
                continue
            http = container[probe]["httpGet"]
            assert container_port(container, http["port"]) == args.port, (where, probe)
            assert get(image_server["url"] + http["path"]) == 200, (where, probe, http)
        if grace is not None:
            pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
            # uvicorn drains for timeout + 5 s after the preStop pause.
            assert grace > pause + args.timeout_s + 5, where


def test_init_container_downloads_the_champion_from_the_registry(onnx_version, tmp_path,
                                                                   monkeypatch):
    """The init container's own code against a local MLflow registry; the server's loader
    reads what it wrote where the server's --model points."""
    from mlflow import MlflowClient

    from serving.predictor import Predictor

    deployment = one(render("onnx"), "Deployment", "food-onnx-server")
    init = pod_spec(deployment)["initContainers"][0]
    server_args = serving_args(pod_spec(deployment)["containers"][0])
    model_path = server_args.model[0].partition("=")[2]
    mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "model")
    assert model_path.startswith(mount + "/")
    env = {e["name"]: e["value"] for e in init["env"] if "value" in e}
    assert env["MODEL_URI"] == "models:/food-classifier@champion"

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    experiment = client.create_experiment("deploy", (tmp_path / "mlartifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(onnx_version), "version")
    client.create_registered_model("food-classifier")
    mv = client.create_model_version("food-classifier", f"{run.info.artifact_uri}/version",
                                     run.info.run_id)
    client.set_registered_model_alias("food-classifier", "champion", mv.version)

    argv = expand(init)
    assert argv[:2] == ["python", "-c"] and argv[2].count(model_path) == 1
    for key, value in {**env, "MLFLOW_TRACKING_URI": tracking}.items():
        monkeypatch.setenv(key, value)
    # In this process (MLflow is imported already); only the destination is moved.
    code = argv[2].replace(model_path, str(tmp_path / "models" / "food"))
    exec(compile(code, "init-container", "exec"), {})  # noqa: S102 - the manifest's own code
    predictor = Predictor.load(tmp_path / "models" / "food")
    assert predictor.labels == ["pizza", "salad", "sushi"]
    assert predictor.predict(jpeg_bytes())[0].label in predictor.labels


# ---- TorchServe --------------------------------------------------------------------------

def torchserve_constants() -> bytes:
    """TorchServe 0.12's configuration class: its property keys and TS_* variable names."""
    import importlib.util

    jar = Path(importlib.util.find_spec("ts").origin).parent / "frontend" / "model-server.jar"
    with zipfile.ZipFile(jar) as z:
        return z.read("org/pytorch/serve/util/ConfigManager.class")


def test_torchserve_manifest_settings_exist_in_torchserve_and_auth_is_on():
    docs = render("torchserve")
    deployment = one(docs, "Deployment", "food-torchserve")
    container = pod_spec(deployment)["containers"][0]
    config_map = one(docs, "ConfigMap")
    properties = dict(line.split("=", 1) for line in
                      config_map["data"]["config.properties"].splitlines()
                      if line and not line.startswith("#"))
    known = torchserve_constants()
    for key in properties:
        assert key.encode() in known, f"config.properties: TorchServe has no setting {key!r}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in env:
        if name.startswith("TS_"):
            assert name.encode() in known, f"TorchServe reads no variable {name}"
    assert properties["disable_token_authorization"] == "false"
    assert env["TS_DISABLE_TOKEN_AUTHORIZATION"] == "false"
    assert properties["enable_envvars_config"] == "true"
    assert "127.0.0.1" in env["TS_MANAGEMENT_ADDRESS"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert env["TS_CONFIG_FILE"] == f"{mount}/config.properties"
    # The root image's CMD, with the configuration coming from TS_CONFIG_FILE instead.
    image_cmd = dockerfile_json(REPO / "Dockerfile", "CMD")
    i = image_cmd.index("--ts-config")
    assert container["command"] == image_cmd[:i] + image_cmd[i + 2:]
    healthcheck = dockerfile_json(REPO / "Dockerfile", "HEALTHCHECK")
    assert container["readinessProbe"]["exec"]["command"] == healthcheck
    assert container["startupProbe"]["exec"]["command"] == healthcheck
    service = one(docs, "Service")
    assert {container_port(container, p["targetPort"]) for p in service["spec"]["ports"]} == \
        {8080, 8082}  # never the management port
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > int(properties["default_response_timeout"]) + 5


# ---- commands of the training CLI ------------------------------------------------------

def training_commands() -> list:
    """Every ``python -m training <sub> ...`` in the manifests, parsed later by the CLI."""
    from training.cli import build_parser

    subcommands = next(a for a in build_parser()._actions
                       if a.__class__.__name__ == "_SubParsersAction").choices
    found = []
    for where, doc in raw_documents():
        if doc["kind"] not in ("Deployment", "CronJob", "Job", "InferenceService"):
            continue
        spec = doc["spec"]["predictor"] if doc["kind"] == "InferenceService" else pod_spec(doc)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            argv = [str(a) for a in c.get("command", []) + c.get("args", [])]
            if argv[:3] == ["python", "-m", "training"]:
                marks = [pytest.mark.xfail(strict=True, reason=RETRAIN_REASON)] \
                    if argv[3] == "retrain" and "retrain" not in subcommands else []
                found.append(pytest.param(argv[3:], id=f"{where}:{argv[3]}", marks=marks))
    return found


@pytest.mark.parametrize("argv", training_commands())
def test_training_commands_in_manifests_parse(argv):
    from training.cli import build_parser

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    assert args.command == argv[0]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if not getattr(args, "takes_overrides", False):
        assert_exact_flags(sub.choices[argv[0]], argv[1:])
    assert not rest or getattr(args, "takes_overrides", False), rest


def test_the_retraining_cronjob_is_there():
    assert any(c.values[0][0] == "retrain" for c in training_commands())


# ---- KServe --------------------------------------------------------------------------------

def kserve(name: str) -> dict:
    [doc] = documents(DEPLOY / "kserve" / name)
    assert doc["apiVersion"] == KSERVE_API and doc["kind"] == "InferenceService"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert set(doc["spec"]) == {"predictor"}
    return doc


def test_kserve_custom_predictor_is_our_server_speaking_v2():
    predictor = kserve("onnx-server-v2.yaml")["spec"]["predictor"]
    assert predictor["minReplicas"] <= predictor["maxReplicas"]
    [container] = predictor["containers"]
    # The pod-spec part of a custom predictor is a Kubernetes container: validate it as one.
    validate_strict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
                     "spec": {"containers": [container]}})
    assert container["name"] == "kserve-container"  # how KServe finds the predictor
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"]
    args = serving_args(container)
    assert [p["containerPort"] for p in container["ports"]] == [args.port] == [8080]
    # KServe's storage initializer writes the model to /mnt/models.
    assert args.model[0].partition("=")[2].rstrip("/") == "/mnt/models"


def test_kserve_triton_runtime_serves_the_onnx_model():
    predictor = kserve("triton-onnx.yaml")["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "onnx"
    assert model["runtime"] == "kserve-tritonserver" and model["protocolVersion"] == "v2"
    assert re.match(r"^(s3|gs|https?|pvc)://", model["storageUri"])
    validate_strict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
                     "spec": {"containers": [{"name": "kserve-container", "image": "triton",
                                              "resources": model["resources"]}]}})


# ---- Triton --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_repo(onnx_version, tmp_path_factory):
    from training.triton import write_triton_repo

    out = tmp_path_factory.mktemp("triton")
    return write_triton_repo(onnx_version, out), onnx_version


def model_config(model_root: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_root / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def test_triton_config_parses_and_agrees_with_the_onnx_graph(triton_repo):
    import onnx
    from tritonclient.grpc import model_config_pb2 as pb

    model_root, version_dir = triton_repo
    config = model_config(model_root)
    graph = onnx.load(str(model_root / "1" / "model.onnx")).graph
    assert (model_root / "1" / "model.onnx").read_bytes() == \
        (version_dir / "model.onnx").read_bytes()
    assert config.name == model_root.name == "food" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    for ours, theirs in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in ours] == [t.name for t in theirs]
        for t, g in zip(ours, theirs):
            assert g.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert t.data_type == pb.TYPE_FP32
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in g.type.tensor_type.shape.dim]
            assert dims[0] == -1 and list(t.dims) == dims[1:]
    [output] = config.output
    labels = (model_root / output.label_filename).read_text().splitlines()
    assert labels == ["pizza", "salad", "sushi"]


def test_triton_repo_versions_are_immutable_and_the_config_follows_the_newest(
        onnx_version, tmp_path):
    import os

    from training.triton import write_triton_repo

    root = write_triton_repo(onnx_version, tmp_path, max_batch_size=4, threads=1)
    with pytest.raises(FileExistsError, match="immutable"):
        write_triton_repo(onnx_version, tmp_path)
    newer = tmp_path / "v2"
    shutil.copytree(onnx_version, newer)
    config = json.loads((newer / "model_config.json").read_text())
    (newer / "model_config.json").write_text(json.dumps({**config, "version": 2}))
    write_triton_repo(newer, tmp_path, max_batch_size=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["1", "2"]
    assert model_config(root).max_batch_size == 2
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-")]
    with pytest.raises(ValueError, match="valid Triton model"):
        write_triton_repo(onnx_version, tmp_path, name="a/b")


def triton_request(model_root: Path, version_dir: Path, images: list[bytes]):
    """What a Triton client sends: the preprocessed FP32 batch under config.pbtxt's input
    name, and the ONNX graph's own top-1 for it (what Triton would compute)."""
    import onnxruntime as ort
    import tritonclient.http as httpclient

    from serving.artifacts import read_model
    from serving.preprocess import preprocess_bytes

    config = model_config(model_root)
    [model_input] = config.input
    spec = read_model(version_dir).spec  # the preprocessing spec, as a client has it
    batch = np.stack([preprocess_bytes(img, spec) for img in images]).astype(np.float32)
    assert list(batch.shape[1:]) == list(model_input.dims)
    infer_input = httpclient.InferInput(model_input.name, list(batch.shape), "FP32")
    infer_input.set_data_from_numpy(batch, binary_data=True)
    session = ort.InferenceSession(str(model_root / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {model_input.name: batch})[0]
    return config, infer_input, [config_labels(model_root)[i] for i in logits.argmax(1)]


def images_for_request(n: int = 4) -> list[bytes]:
    return [jpeg_bytes(40 + 9 * i, 60 - 5 * i, seed=10 + i) for i in range(n)]


@pytest.mark.integration
def test_a_triton_client_request_gets_the_same_top1_from_our_server(triton_repo,
                                                                    image_server):
    import tritonclient.http as httpclient

    model_root, version_dir = triton_repo
    config, infer_input, want = triton_request(model_root, version_dir, images_for_request())
    client = httpclient.InferenceServerClient(url=image_server["url"].removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(config.name)
    result = client.infer(config.name, [infer_input])
    got = [s.decode() for s in result.as_numpy("label")]
    assert got == want
    assert list(result.as_numpy("probabilities").argmax(1)) == \
        [config_labels(model_root).index(label) for label in want]


def config_labels(model_root: Path) -> list[str]:
    return (model_root / "labels.txt").read_text().splitlines()


@pytest.mark.integration
def test_a_triton_client_asking_for_the_graph_output_gets_it_from_our_server(triton_repo,
                                                                             image_server):
    import tritonclient.http as httpclient

    model_root, version_dir = triton_repo
    config, infer_input, want = triton_request(model_root, version_dir, images_for_request())
    [output] = config.output
    client = httpclient.InferenceServerClient(url=image_server["url"].removeprefix("http://"))
    result = client.infer(config.name, [infer_input],
                          outputs=[httpclient.InferRequestedOutput(output.name)])
    labels = config_labels(model_root)
    assert [labels[i] for i in result.as_numpy(output.name).argmax(1)] == want


def test_readme_lists_what_could_not_run_here():
    text = (DEPLOY / "README.md").read_text()
    assert "not measured" in text and "kubectl kustomize" in text
    for piece in ("onnx-server/Dockerfile", "overlays/onnx", "overlays/torchserve",
                  "kserve/", "--triton-repo"):
        assert piece in text, piece
