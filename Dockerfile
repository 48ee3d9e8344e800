# TorchServe image serving model_store/food.mar (build it first: make train && make archive).
#   docker build -t food-classifier .
#   docker run --rm -p 8080:8080 food-classifier
# Only inference faces the network (0.0.0.0:8080), with token authorization ON: read the
# inference key with `docker exec <id> cat /home/model-server/key_file.json` and send
# curl -H "Authorization: Bearer <key>" -T pizza.jpg localhost:8080/predictions/food
# The management (8081) and metrics (8082) APIs listen on the container's loopback: use them
# with `docker exec`, or scrape metrics from a sidecar sharing the pod's network.
FROM python:3.11-slim-bookworm

# TorchServe's frontend is Java 17; bookworm's security updates of it are wanted, not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 model-server
WORKDIR /home/model-server

# The project with its serving extras; CPU wheels of torch from PyTorch's index. torch is
# pinned here, the rest by pyproject.toml's version ranges.
COPY pyproject.toml README.md ./
COPY training ./training
COPY serving ./serving
COPY handlers ./handlers
COPY benchmarks ./benchmarks
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        "torch==2.14.1" ".[serve,openvino,torchserve]"

COPY serve_config ./serve_config
COPY model_store/food.mar ./model_store/food.mar
RUN chown -R model-server:model-server /home/model-server

USER 1000:1000
# Override config.properties' loopback inference address (enable_envvars_config=true) and turn
# token authorization back on, because that address is reachable from outside; management
# (model registration: TorchServe's 2023 CVEs) and metrics stay on loopback. (No secret
# here: the variable only switches authorization on.) TorchServe 0.12's inference key expires
# after 60 minutes and only the management API renews it, so the HEALTHCHECK (which sends it)
# would fail after an hour: the key lives as long as the container instead.
# hadolint ignore=DL3064
ENV TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_MANAGEMENT_ADDRESS=http://127.0.0.1:8081 \
    TS_METRICS_ADDRESS=http://127.0.0.1:8082 \
    TS_DISABLE_TOKEN_AUTHORIZATION=false \
    TS_TOKEN_EXPIRATION_MIN=525600 \
    OMP_WAIT_POLICY=PASSIVE \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs
EXPOSE 8080

# tests/test_torchserve.py runs this same CMD and HEALTHCHECK command.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "serve_config/healthcheck.py"]
CMD ["torchserve", "--foreground", "--ts-config", "serve_config/config.properties", "--models", "food=food.mar", "--ncs"]
