"""A real S3-protocol server on loopback for the tests: moto's server mode (``moto[server]``, a
test extra), run in a thread of the test process on a free port of 127.0.0.1.

Everything reaches it the way a user's S3 would be reached: ``AWS_ENDPOINT_URL`` and the
``AWS_*`` credentials in the environment, which pyarrow's S3 client reads. They are set before
any Ray cluster of the module starts, so its workers inherit them, and so does a
``lipsync-ray`` subprocess. The server keeps its objects across :meth:`S3Server.restart`
(moto's state lives in this process), like a real server restarted in place; while it is down
every request fails (open connections are cut, new ones dropped unanswered) and the requests
that arrived are kept, so a test can show they were retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

REGION = "us-east-1"
BUCKET = "lipsync"
# moto accepts any key until IAM checks are switched on (S3Server.iam_checks).
ACCESS_KEY, SECRET_KEY = "testing", "testing"


class _RequestLog(logging.Handler):
    """The server's access log (werkzeug's logger), kept in memory: ``GET /bucket/key``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        line = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours some
        with self._lock:
            self.lines.append(line)

    def count(self, method: str, path: str) -> int:
        """Requests ``method path`` answered (any status, any query string)."""
        with self._lock:
            heads = (f'"{method} {path} ', f'"{method} {path}?')
            return sum(1 for line in self.lines if any(h in line for h in heads))

    def answered(self, request_line: str, since: int = 0) -> bool:
        """Whether ``request_line`` (``PUT /bucket/key?query HTTP/1.1``, as sent) was answered,
        looking from the ``since``-th logged request on."""
        with self._lock:
            return any(f'"{request_line}"' in line for line in self.lines[since:])


# pyarrow's S3 client asks for this key to learn whether a "directory" exists; a failed probe
# is answered by a fresh listing, not sent again.
PROBE_KEY = "extremelyunlikelytoexist"


def is_probe(request_line: str) -> bool:
    """Whether ``request_line`` is one of pyarrow's existence probes."""
    return PROBE_KEY in request_line


@dataclass
class S3Server:
    endpoint: str
    port: int
    bucket: str = BUCKET
    requests: _RequestLog = field(default_factory=_RequestLog)
    _server: object = None
    _connections: list = field(default_factory=list)  # accepted sockets, cut by stop()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def filesystem(self, **kw) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            endpoint_override=self.endpoint, region=REGION, access_key=kw.pop("access_key",
            ACCESS_KEY), secret_key=kw.pop("secret_key", SECRET_KEY), **kw,
        )  # fmt: skip

    def client(self, service: str = "s3"):
        import boto3

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )  # fmt: skip

    def keys(self, prefix: str) -> list[str]:
        """Object keys under ``prefix``, leaving out the empty ``.../`` markers pyarrow writes
        for directories."""
        paginator = self.client().get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.bucket, Prefix=prefix)
        keys = (o["Key"] for page in pages for o in page.get("Contents", ()))
        return sorted(k for k in keys if not k.endswith("/"))

    def put_file(self, local, key: str) -> str:
        self.client().upload_file(str(local), self.bucket, key)
        return self.uri(key)

    def put_tree(self, local_dir, prefix: str) -> str:
        from pathlib import Path

        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.put_file(path, f"{prefix}/{path.relative_to(local_dir).as_posix()}")
        return self.uri(prefix)

    def get_file(self, key: str, local) -> None:
        self.client().download_file(self.bucket, key, str(local))

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        # Keep every accepted connection, so stop() can cut the kept-alive ones: werkzeug's
        # threads would otherwise go on answering them after the server stopped.
        wsgi = self._server._server
        accept = wsgi.get_request

        def get_request():
            conn, address = accept()
            self._connections.append(conn)
            return conn, address

        wsgi.get_request = get_request

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # closes the listening socket: clients get "connection refused"
            self._server = None
        for conn in self._connections:  # and open connections are cut: "connection reset"
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    def restart(self, down_s: float = 0.0, *, until_dropped: int = 0) -> list[str]:
        """Stop the server for ``down_s`` seconds, and longer until ``until_dropped`` requests
        have come in (at most 60 s; pyarrow's existence probes, which it never sends twice,
        do not count), then start it again with the same objects. Meanwhile connections are
        accepted and closed without an answer (what a client sees of a server that dies under
        it). Returns the request lines that were dropped so."""
        self.stop()
        dropped: list[str] = []
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            sock.settimeout(0.05)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 60:
                counted = [line for line in dropped if not is_probe(line)]
                if time.monotonic() - t0 >= down_s and len(counted) >= until_dropped:
                    break
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(2.0)
                    with contextlib.suppress(OSError):
                        head = conn.recv(65536).split(b"\r\n", 1)[0]
                        dropped.append(head.decode("latin-1"))
        self.start()
        return dropped

    def iam_key(self) -> tuple[str, str]:
        """A real IAM user's key pair, allowed everything (for when IAM checks are on)."""
        iam = self.client("iam")
        with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
            iam.create_user(UserName="renderer")
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(
            UserName="renderer", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="renderer")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def iam_checks(self) -> Iterator[None]:
        """Signatures and keys checked against moto's IAM (off by default: any key works)."""
        from moto.core.authorization import enable_iam_authentication

        with enable_iam_authentication():
            yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
       "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")  # fmt: skip


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start the server with an empty bucket, point the ``AWS_*`` environment at it, and undo
    both at the end."""
    port = free_port()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port)
    access = logging.getLogger("werkzeug")
    saved_env = {k: os.environ.get(k) for k in ENV}
    saved_log = (access.level, access.propagate)
    access.addHandler(server.requests)
    access.setLevel(logging.INFO)
    access.propagate = False  # not on the test's output
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",  # no instance-metadata lookups on a CI machine
    )  # fmt: skip
    server.start()
    try:
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()
        access.removeHandler(server.requests)
        access.setLevel(saved_log[0])
        access.propagate = saved_log[1]
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
