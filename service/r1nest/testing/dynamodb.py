"""DynamoDB for tests: moto in-process and as a server on loopback, with fake credentials.

moto handles requests on several threads with no lock around its DynamoDB model, so two
concurrent transactions can interleave inside moto (and its rollback of a cancelled
transaction restores a copy of the whole table, wiping a concurrent commit). Real DynamoDB
applies each request atomically; both helpers here give moto the same property by handling one
request at a time, while the clients stay as concurrent as they like.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
REGION = "us-east-1"


class _OneRequestAtATime:
    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        with self._lock:
            # Materialise the body inside the lock: moto may build it lazily.
            return list(self._app(environ, start_response))


@contextmanager
def _one_table_copy_per_transaction() -> Iterator[None]:
    """moto backs up a table by deep copy once per item of a transaction, before running it;
    the copies are identical, so one is enough (ours has three items: three times faster).
    Sound only while requests are handled one at a time, as both helpers here ensure."""
    import copy
    import types
    from unittest import mock

    from moto.dynamodb import models

    original = models.DynamoDBBackend.transact_write_items

    def transact_write_items(self: Any, transact_items: Any) -> Any:
        copies: dict[int, Any] = {}

        def deepcopy(value: Any, memo: Any = None) -> Any:
            if id(value) not in copies:
                copies[id(value)] = (value, copy.deepcopy(value, memo))
            return copies[id(value)][1]

        with mock.patch.object(models, "copy", types.SimpleNamespace(deepcopy=deepcopy)):
            return original(self, transact_items)

    models.DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    try:
        yield
    finally:
        models.DynamoDBBackend.transact_write_items = original  # type: ignore[method-assign]


@contextmanager
def serialized_mock_aws() -> Iterator[None]:
    """`moto.mock_aws()`, with requests from concurrent threads handled one at a time."""
    from moto import mock_aws
    from moto.core.botocore_stubber import BotocoreStubber

    original = BotocoreStubber.process_request
    lock = threading.Lock()

    def process_request(self: Any, request: Any) -> Any:
        with lock:
            return original(self, request)

    BotocoreStubber.process_request = process_request  # type: ignore[method-assign]
    try:
        with mock_aws(), _one_table_copy_per_transaction():
            yield
    finally:
        BotocoreStubber.process_request = original  # type: ignore[method-assign]


@contextmanager
def moto_dynamodb_server() -> Iterator[str]:
    """Start moto's server on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass  # one line per request drowns test output

    class SerializedMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(
                self._ip_address, self._port, app, True, request_handler=QuietHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    server = SerializedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with _one_table_copy_per_transaction():
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
