"""The protocol both sides share: neutral types, limits and the codecs of both transports.

Imported by the worker and by every host; imports neither `sidecar.worker` nor `sidecar.host`
(tests/test_layering.py checks it). The wire contract itself is `protos/sidecar/v1/sidecar.proto`;
everything here that names a field takes it from that file's descriptors (`schema`).

    refs.py         TensorRef / ArrowRef / storages, and the byte span of a strided tensor
    calls.py        Call / CallResult / OutputSpec / Placement / Timing (transport <-> dispatcher)
    error_kinds.py  ErrorKind and the structured error fields (from sidecar.v1.Error)
    limits.py       defaults and bounds both sides agree on (inline threshold, message sizes, ...)
    schema.py       the .proto's messages as field tables, read once from the descriptors
    records.py      neutral objects <-> records (dicts keyed by the .proto's field names)
    grpc_codec.py   records <-> protobuf messages, errors <-> gRPC statuses
    port_codec.py   records <-> Erlang terms of the port transport (`sidecar serve --stdio`)

The classes of the errors stay importable as `sidecar.errors` (the public path).
"""
