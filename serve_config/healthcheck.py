"""Exit 0 when TorchServe's /ping answers Healthy (the Dockerfile's HEALTHCHECK).

Sends the inference token from ``key_file.json`` when token authorization wrote one, since
TorchServe 0.12 refuses even /ping without it. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    address = os.environ.get("TS_INFERENCE_ADDRESS", "http://127.0.0.1:8080")
    address = address.replace("0.0.0.0", "127.0.0.1")
    headers = {}
    if os.path.exists("key_file.json"):
        with open("key_file.json") as f:
            headers["Authorization"] = "Bearer " + json.load(f)["inference"]["key"]
    request = urllib.request.Request(f"{address}/ping", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            healthy = json.load(response).get("status") == "Healthy"
    except (OSError, ValueError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
