"""A real S3-compatible server for the tests: moto's, on 127.0.0.1, started by the tests.

`S3Server` runs moto's ``ThreadedMotoServer`` in the test process. Moto keeps
its buckets in module-level backends, so the server can be stopped (clients
then get "connection refused") and started again on the same port with its
objects intact: the outage test relies on that. `auth_s3_server` runs a
separate ``moto.server`` process that authenticates every request, so wrong
credentials are refused as a real store would refuse them.

Nothing here reaches AWS: the endpoint is always 127.0.0.1, instance-metadata
lookups are disabled and the region is set.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

REGION = "eu-west-1"
ACCESS_KEY = "fiqa-test-access-key"
# A unique value the tests search every output and log for: it must never appear.
SECRET_KEY = f"fiqa-test-secret-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def aws_env(secret: str = SECRET_KEY, access: str = ACCESS_KEY) -> dict[str, str]:
    """The AWS environment of a test: dummy credentials, a region, no metadata service."""
    return {
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


# Variables that could send a test's requests elsewhere than the test server.
_FOREIGN = (
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "FSSPEC_S3",
)


def clean_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with the test's AWS settings."""
    env = {k: v for k, v in (base or os.environ).items() if k not in _FOREIGN}
    env.update(aws_env())
    env.update(extra)
    return env


class S3Server:
    """moto's S3 server in this process, on a fixed free port, stoppable and restartable."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_for_port(self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def storage_config(self) -> dict:
        """The run config's ``storage`` section for this server."""
        return {"endpoint_url": self.endpoint, "region": REGION, "addressing_style": "path"}

    def fs(self):
        """A test-side client (its own instance: no cache shared with the code under test)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": REGION},
            config_kwargs={"s3": {"addressing_style": "path"}},
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"fiqa-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """The test session's S3 server; this process's AWS environment points at nothing else."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved = dict(os.environ)
    for k in _FOREIGN:
        os.environ.pop(k, None)
    os.environ.update(aws_env())
    server = S3Server()
    server.start()
    yield server
    server.stop()
    from fiqa import storage

    storage.configure(None)  # (this exports to os.environ: restored just below)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture()
def bucket(s3_server) -> str:
    """A fresh, empty bucket."""
    return s3_server.make_bucket()


@pytest.fixture()
def auth_s3_server():
    """A moto server process that authenticates every request: all keys are unknown to it."""
    port = free_port()
    env = clean_env(INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
