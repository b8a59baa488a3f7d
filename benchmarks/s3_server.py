"""A local S3-compatible server for the remote group (moto's standalone server, as in the tests),
run in its own process so the timed operations share no interpreter with it.

``python s3_server.py`` prints its endpoint on the first line, then serves until stdin closes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BUCKET = "bench"
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def start() -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start the server; the environment that points clients at it (``AWS_ENDPOINT_URL``, keys)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
    )
    assert proc.stdout is not None
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http"):
        proc.kill()
        raise RuntimeError("the S3 server did not start (is moto[server] installed? pip install 'moto[server]')")
    return proc, {**ENV, "AWS_ENDPOINT_URL": endpoint}


def stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(30)


def main() -> None:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    print(endpoint, flush=True)
    sys.stdin.read()  # until the benchmark closes it
    server.stop()


if __name__ == "__main__":
    main()
