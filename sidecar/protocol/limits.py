"""Defaults and bounds both sides of the boundary agree on, each written once.

Worker flags (`sidecar serve --help`), `WorkerOptions`, `Client`, `Pool` and the codecs take their
defaults from here; a guide that quotes a default quotes these.
"""
from __future__ import annotations

# -- values on the wire ---------------------------------------------------------------------------
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
UINT32_MAX = (1 << 32) - 1

# -- tensors ----------------------------------------------------------------------------------------
# Outputs (and host inputs) smaller than this travel inside the message (`--inline-threshold`).
DEFAULT_INLINE_THRESHOLD = 64 << 10
MAX_NDIM = 32                 # NumPy 1.x's limit; NumPy 2 allows 64, torch is fine with either
MAX_SEGMENT_NAME = 255        # NAME_MAX for /dev/shm entries
CUDA_IPC_HANDLE_BYTES = 64    # a CUipcMemHandle

# -- calls ------------------------------------------------------------------------------------------
DEFAULT_MAX_CONCURRENCY = 4   # ops running at once (`--max-concurrency`)
DEFAULT_MAX_QUEUE = 64        # calls waiting beyond that before OVERLOADED (`--max-queue`)
MAX_ATTRS = 256               # attrs per call (an op's parameters, not data)
MAX_ATTR_NAME = 128           # characters of an attr name

# -- streams (ExecuteStream, {:stream, ...}; guides/streaming.md) ------------------------------------
# A stream's window: chunks sent and not yet acknowledged by the host, and the bytes of their
# tensors. The generator is paused while the window is full, so a slow consumer bounds the worker.
DEFAULT_STREAM_MAX_CHUNKS = 16
DEFAULT_STREAM_MAX_BYTES = 64 << 20
MAX_STREAM_MAX_CHUNKS = 4096  # a larger per-call window is cut to this

# -- leases -----------------------------------------------------------------------------------------
DEFAULT_LEASE_TTL_S = 300.0   # an unreleased output lease is reclaimed (unlinked) after this
DEFAULT_MAX_LEASES = 10000    # beyond this many the oldest lease is reclaimed the same way

# -- transports -------------------------------------------------------------------------------------
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20   # gRPC messages, both ways (`--max-message-bytes`)
DEFAULT_MAX_FRAME_BYTES = 1 << 30     # port frames, as received and as inflated (`--max-frame-bytes`)

# -- the worker's environment, as a pool sets it -----------------------------------------------------
HOST_PID_ENV = "SIDECAR_HOST_PID"            # the host to watch instead of our parent (maybe the template)
CANCEL_GRACE_ENV = "SIDECAR_CANCEL_GRACE_S"  # how long a cancelled call may run on before it counts as stuck
DEFAULT_CANCEL_GRACE_S = 10.0               # ... when the variable is unset (0: never)

# -- shutdown ---------------------------------------------------------------------------------------
DEFAULT_GRACE_PERIOD_S = 10.0  # SIGTERM: in-flight calls finish and are answered (`--grace-period`)
HOST_GONE_GRACE_S = 5.0        # stdin EOF on the port: calls may still finish and free what they hold
FAST_GRACE_S = 0.5             # parent died or device tainted: nobody waits for long

# -- telemetry --------------------------------------------------------------------------------------
DEFAULT_MEMORY_INTERVAL_S = 1.0   # memory samples of a watcher that asks for no interval
MAX_WATCHERS = 8                  # telemetry streams a worker serves at once
MAX_BATCH_WINDOW_MS = 1000        # a batching watcher waits at most this long per message
TELEMETRY_BATCH_MAX = 1024        # events per batched message (~100 KB), far below the message limit

# -- errors -----------------------------------------------------------------------------------------
# A failed call's status travels in HTTP/2 headers: grpc-message (percent-encoded) and
# grpc-status-details-bin (base64). gRPC drops metadata over 8 KiB (soft) / 16 KiB (hard) by default,
# and the caller then gets a bare RESOURCE_EXHAUSTED with no details: errors that echo long input
# (a 10 KB op name, thousands of attrs, a user's huge message) are cut to stay well inside that.
STATUS_MESSAGE_BYTES = 512    # grpc-message (== google.rpc.Status.message)
ERROR_MESSAGE_BYTES = 1024    # sidecar.v1.Error.message
ERROR_FIELD_BYTES = 256       # each other string, and each item of a list
ERROR_TRACEBACK_BYTES = 2048
ERROR_LIST_ITEMS = 16
ERROR_BYTES = 3072            # the whole serialized sidecar.v1.Error
ECHO_CHARS = 80               # how much of a caller's value an error message repeats

# Sessions (ExecuteRequest.session_id): a session's worker-side state is freed after this long
# without a call, unless its calls give their own session_ttl_s (`sidecar serve --session-ttl`).
DEFAULT_SESSION_TTL_S = 600.0
