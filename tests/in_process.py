"""A worker runtime in the test process, called by a real `Client` over the in-process transport.

`RecordingTransport` is `InProcessTransport` keeping what crossed it (the `Call`s the client sent and
the `CallResult`s it got back), so that a test can check the descriptors themselves (where outputs
lie, what a lease covers) as well as what the caller received.
"""
from __future__ import annotations

from sidecar.protocol.refs import ShmStorage, TensorRef
from sidecar.host.client import Client
from sidecar.worker.local_transport import InProcessTransport
from sidecar.protocol.calls import Call, CallResult
from sidecar.worker.runtime import Runtime
from tests.workers import session_run


class RecordingTransport(InProcessTransport):
    def __init__(self, runtime: Runtime, *, shm_inputs_only: bool = False) -> None:
        super().__init__(runtime)
        self.shm_inputs_only = shm_inputs_only  # every tensor input must travel through shared memory
        self.calls: list[Call] = []
        self.results: list[CallResult] = []

    def execute(self, call: Call, timeout: float | None = None) -> CallResult:
        if self.shm_inputs_only:
            for ref in call.inputs:
                assert not isinstance(ref, TensorRef) or isinstance(ref.storage, ShmStorage) or ref.nbytes == 0, ref
        self.calls.append(call)
        result = super().execute(call, timeout)
        self.results.append(result)
        return result

    @property
    def last_call(self) -> Call:
        return self.calls[-1]

    @property
    def last(self) -> CallResult:
        return self.results[-1]


def in_process_client(runtime: Runtime, tag: str, *, shm_inputs_only: bool = True,
                      **options: object) -> tuple[Client, RecordingTransport]:
    """A Client of `runtime` whose tensor inputs cross through shared memory (inline_threshold 0; with
    `shm_inputs_only` a call whose inputs do not fails)."""
    transport = RecordingTransport(runtime, shm_inputs_only=shm_inputs_only)
    client = Client(transport=transport, run_id=session_run(tag), inline_threshold=0, **options)  # type: ignore[arg-type]
    return client, transport
