"""`make test-compose`: the integration suite against the docker compose stack.

Brings the stack up (`docker compose up --wait --build`, two messages replicas),
points the suite at the published ports, and always tears the stack down with
its volumes. Images come from POSTGRES_IMAGE / PYTHON_IMAGE as in compose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSE = ["docker", "compose", "-f", str(REPO / "docker-compose.yml")]


def main(argv: list[str]) -> int:
    up = [*COMPOSE, "up", "--wait", "--build", "--quiet-build", "--scale", "messages=2"]
    subprocess.run(up, cwd=REPO, check=True)
    try:
        env = {
            **os.environ,
            "USERS_ADDR": "127.0.0.1:50051",
            "THREADS_ADDR": "127.0.0.1:50052",
            "MESSAGES_ADDR": "127.0.0.1:50053",
            "MESSAGES_REPLICA_ADDR": "127.0.0.1:50054",
            "METRICS_ADDRS": "127.0.0.1:9101,127.0.0.1:9102,127.0.0.1:9103,127.0.0.1:9104",
        }
        return subprocess.call(
            [sys.executable, "-m", "pytest", "tests/integration", *argv], cwd=REPO, env=env
        )
    finally:
        subprocess.run([*COMPOSE, "down", "--volumes", "--remove-orphans"], cwd=REPO, check=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
