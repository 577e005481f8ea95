from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_AUTO: _ClassVar[Placement]
    PLACEMENT_SHM: _ClassVar[Placement]
    PLACEMENT_INLINE: _ClassVar[Placement]
    PLACEMENT_DEVICE: _ClassVar[Placement]
    PLACEMENT_OUT: _ClassVar[Placement]

class ErrorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_KIND_UNSPECIFIED: _ClassVar[ErrorKind]
    SHAPE_MISMATCH: _ClassVar[ErrorKind]
    DTYPE_MISMATCH: _ClassVar[ErrorKind]
    DEVICE_MISMATCH: _ClassVar[ErrorKind]
    OUT_OF_MEMORY: _ClassVar[ErrorKind]
    INVALID_TENSOR_REF: _ClassVar[ErrorKind]
    UNKNOWN_OP: _ClassVar[ErrorKind]
    OP_FAILED: _ClassVar[ErrorKind]
    OVERLOADED: _ClassVar[ErrorKind]
    DEVICE_UNAVAILABLE: _ClassVar[ErrorKind]
    WORKER_CRASHED: _ClassVar[ErrorKind]
    CIRCUIT_OPEN: _ClassVar[ErrorKind]
    INVALID_ARGUMENT: _ClassVar[ErrorKind]
    CANCELLED: _ClassVar[ErrorKind]
    RESOURCE_FAILED: _ClassVar[ErrorKind]
    SESSION_LOST: _ClassVar[ErrorKind]
PLACEMENT_AUTO: Placement
PLACEMENT_SHM: Placement
PLACEMENT_INLINE: Placement
PLACEMENT_DEVICE: Placement
PLACEMENT_OUT: Placement
ERROR_KIND_UNSPECIFIED: ErrorKind
SHAPE_MISMATCH: ErrorKind
DTYPE_MISMATCH: ErrorKind
DEVICE_MISMATCH: ErrorKind
OUT_OF_MEMORY: ErrorKind
INVALID_TENSOR_REF: ErrorKind
UNKNOWN_OP: ErrorKind
OP_FAILED: ErrorKind
OVERLOADED: ErrorKind
DEVICE_UNAVAILABLE: ErrorKind
WORKER_CRASHED: ErrorKind
CIRCUIT_OPEN: ErrorKind
INVALID_ARGUMENT: ErrorKind
CANCELLED: ErrorKind
RESOURCE_FAILED: ErrorKind
SESSION_LOST: ErrorKind

class ShmRef(_message.Message):
    __slots__ = ("name", "offset", "nbytes", "inode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    nbytes: int
    inode: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., inode: _Optional[int] = ...) -> None: ...

class CudaIpcRef(_message.Message):
    __slots__ = ("handle", "offset", "nbytes", "device_index", "device_uuid", "alloc_nbytes")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    ALLOC_NBYTES_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    offset: int
    nbytes: int
    device_index: int
    device_uuid: str
    alloc_nbytes: int
    def __init__(self, handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., device_index: _Optional[int] = ..., device_uuid: _Optional[str] = ..., alloc_nbytes: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "strides", "shm", "inline_data", "cuda_ipc")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDES_FIELD_NUMBER: _ClassVar[int]
    SHM_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    strides: _containers.RepeatedScalarFieldContainer[int]
    shm: ShmRef
    inline_data: bytes
    cuda_ipc: CudaIpcRef
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., strides: _Optional[_Iterable[int]] = ..., shm: _Optional[_Union[ShmRef, _Mapping]] = ..., inline_data: _Optional[bytes] = ..., cuda_ipc: _Optional[_Union[CudaIpcRef, _Mapping]] = ...) -> None: ...

class ArrowTable(_message.Message):
    __slots__ = ("shm", "inline_data", "num_rows")
    SHM_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    shm: ShmRef
    inline_data: bytes
    num_rows: int
    def __init__(self, shm: _Optional[_Union[ShmRef, _Mapping]] = ..., inline_data: _Optional[bytes] = ..., num_rows: _Optional[int] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class ValueMap(_message.Message):
    __slots__ = ("items",)
    class ItemsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.MessageMap[str, Value]
    def __init__(self, items: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("tensor", "arrow", "f64", "i64", "b", "s", "raw", "list", "map", "none")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ARROW_FIELD_NUMBER: _ClassVar[int]
    F64_FIELD_NUMBER: _ClassVar[int]
    I64_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    LIST_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    NONE_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    arrow: ArrowTable
    f64: float
    i64: int
    b: bool
    s: str
    raw: bytes
    list: ValueList
    map: ValueMap
    none: _empty_pb2.Empty
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., arrow: _Optional[_Union[ArrowTable, _Mapping]] = ..., f64: _Optional[float] = ..., i64: _Optional[int] = ..., b: _Optional[bool] = ..., s: _Optional[str] = ..., raw: _Optional[bytes] = ..., list: _Optional[_Union[ValueList, _Mapping]] = ..., map: _Optional[_Union[ValueMap, _Mapping]] = ..., none: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ...) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("placement", "out", "inline_threshold", "allow_alias")
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    INLINE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ALIAS_FIELD_NUMBER: _ClassVar[int]
    placement: Placement
    out: _containers.RepeatedCompositeFieldContainer[Tensor]
    inline_threshold: int
    allow_alias: bool
    def __init__(self, placement: _Optional[_Union[Placement, str]] = ..., out: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., inline_threshold: _Optional[int] = ..., allow_alias: _Optional[bool] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("op", "inputs", "attrs", "output", "release", "request_id", "idempotent", "client_pid", "client_id", "session_id", "session_ttl_s", "stream_max_chunks", "stream_max_bytes")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_PID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    STREAM_MAX_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    STREAM_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    op: str
    inputs: _containers.RepeatedCompositeFieldContainer[Value]
    attrs: _containers.MessageMap[str, Value]
    output: OutputSpec
    release: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    idempotent: bool
    client_pid: int
    client_id: str
    session_id: str
    session_ttl_s: float
    stream_max_chunks: int
    stream_max_bytes: int
    def __init__(self, op: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., attrs: _Optional[_Mapping[str, Value]] = ..., output: _Optional[_Union[OutputSpec, _Mapping]] = ..., release: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., idempotent: _Optional[bool] = ..., client_pid: _Optional[int] = ..., client_id: _Optional[str] = ..., session_id: _Optional[str] = ..., session_ttl_s: _Optional[float] = ..., stream_max_chunks: _Optional[int] = ..., stream_max_bytes: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ns", "decode_ns", "compute_ns", "encode_ns", "total_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    decode_ns: int
    compute_ns: int
    encode_ns: int
    total_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., decode_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("outputs", "leases", "timing", "device", "bytes_in", "bytes_out", "request_id")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[Value]
    leases: _containers.RepeatedScalarFieldContainer[str]
    timing: Timing
    device: str
    bytes_in: int
    bytes_out: int
    request_id: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., leases: _Optional[_Iterable[str]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., device: _Optional[str] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ExecuteChunk(_message.Message):
    __slots__ = ("values", "leases", "index", "bytes", "end")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    leases: _containers.RepeatedScalarFieldContainer[str]
    index: int
    bytes: int
    end: ExecuteResponse
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., leases: _Optional[_Iterable[str]] = ..., index: _Optional[int] = ..., bytes: _Optional[int] = ..., end: _Optional[_Union[ExecuteResponse, _Mapping]] = ...) -> None: ...

class ChunkAck(_message.Message):
    __slots__ = ("request_id", "client_id", "chunks", "release")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    client_id: str
    chunks: int
    release: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., client_id: _Optional[str] = ..., chunks: _Optional[int] = ..., release: _Optional[_Iterable[str]] = ...) -> None: ...

class ChunkAckResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, leases: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "unknown")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    released: int
    unknown: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released: _Optional[int] = ..., unknown: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("name", "loader", "kwargs", "request_id")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOADER_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    loader: str
    kwargs: _containers.MessageMap[str, Value]
    request_id: str
    def __init__(self, name: _Optional[str] = ..., loader: _Optional[str] = ..., kwargs: _Optional[_Mapping[str, Value]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ResourceInfo(_message.Message):
    __slots__ = ("name", "loader", "device", "type", "host_bytes", "device_bytes", "load_ns", "pid", "already_loaded")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOADER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_NS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_LOADED_FIELD_NUMBER: _ClassVar[int]
    name: str
    loader: str
    device: str
    type: str
    host_bytes: int
    device_bytes: int
    load_ns: int
    pid: int
    already_loaded: bool
    def __init__(self, name: _Optional[str] = ..., loader: _Optional[str] = ..., device: _Optional[str] = ..., type: _Optional[str] = ..., host_bytes: _Optional[int] = ..., device_bytes: _Optional[int] = ..., load_ns: _Optional[int] = ..., pid: _Optional[int] = ..., already_loaded: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("resource",)
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: ResourceInfo
    def __init__(self, resource: _Optional[_Union[ResourceInfo, _Mapping]] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadResponse(_message.Message):
    __slots__ = ("unloaded", "host_bytes_freed", "device_bytes_freed", "device_reserved_freed")
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_RESERVED_FREED_FIELD_NUMBER: _ClassVar[int]
    unloaded: bool
    host_bytes_freed: int
    device_bytes_freed: int
    device_reserved_freed: int
    def __init__(self, unloaded: _Optional[bool] = ..., host_bytes_freed: _Optional[int] = ..., device_bytes_freed: _Optional[int] = ..., device_reserved_freed: _Optional[int] = ...) -> None: ...

class ListResourcesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "calls", "idle_s", "ttl_s", "keys")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    calls: int
    idle_s: float
    ttl_s: float
    keys: int
    def __init__(self, session_id: _Optional[str] = ..., calls: _Optional[int] = ..., idle_s: _Optional[float] = ..., ttl_s: _Optional[float] = ..., keys: _Optional[int] = ...) -> None: ...

class ResourceList(_message.Message):
    __slots__ = ("resources", "sessions")
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    resources: _containers.RepeatedCompositeFieldContainer[ResourceInfo]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, resources: _Optional[_Iterable[_Union[ResourceInfo, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("closed",)
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    closed: bool
    def __init__(self, closed: _Optional[bool] = ...) -> None: ...

class ListOpsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpInfo(_message.Message):
    __slots__ = ("name", "doc", "min_inputs", "max_inputs", "idempotent", "attrs", "module", "takes_context")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    MIN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    TAKES_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    name: str
    doc: str
    min_inputs: int
    max_inputs: int
    idempotent: bool
    attrs: _containers.RepeatedScalarFieldContainer[str]
    module: str
    takes_context: bool
    def __init__(self, name: _Optional[str] = ..., doc: _Optional[str] = ..., min_inputs: _Optional[int] = ..., max_inputs: _Optional[int] = ..., idempotent: _Optional[bool] = ..., attrs: _Optional[_Iterable[str]] = ..., module: _Optional[str] = ..., takes_context: _Optional[bool] = ...) -> None: ...

class OpList(_message.Message):
    __slots__ = ("ops",)
    OPS_FIELD_NUMBER: _ClassVar[int]
    ops: _containers.RepeatedCompositeFieldContainer[OpInfo]
    def __init__(self, ops: _Optional[_Iterable[_Union[OpInfo, _Mapping]]] = ...) -> None: ...

class HardwareRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CpuInfo(_message.Message):
    __slots__ = ("model", "cores", "threads", "flags", "memory_total", "memory_available", "arch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    cores: int
    threads: int
    flags: _containers.RepeatedScalarFieldContainer[str]
    memory_total: int
    memory_available: int
    arch: str
    def __init__(self, model: _Optional[str] = ..., cores: _Optional[int] = ..., threads: _Optional[int] = ..., flags: _Optional[_Iterable[str]] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., arch: _Optional[str] = ...) -> None: ...

class CudaDevice(_message.Message):
    __slots__ = ("index", "name", "uuid", "memory_total", "memory_free", "compute_major", "compute_minor", "utilization_percent", "temperature_c")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MAJOR_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MINOR_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    uuid: str
    memory_total: int
    memory_free: int
    compute_major: int
    compute_minor: int
    utilization_percent: int
    temperature_c: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_free: _Optional[int] = ..., compute_major: _Optional[int] = ..., compute_minor: _Optional[int] = ..., utilization_percent: _Optional[int] = ..., temperature_c: _Optional[int] = ...) -> None: ...

class CudaInfo(_message.Message):
    __slots__ = ("available", "driver_version", "cuda_version", "runtime_version", "devices", "reason")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DRIVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CUDA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    available: bool
    driver_version: str
    cuda_version: str
    runtime_version: str
    devices: _containers.RepeatedCompositeFieldContainer[CudaDevice]
    reason: str
    def __init__(self, available: _Optional[bool] = ..., driver_version: _Optional[str] = ..., cuda_version: _Optional[str] = ..., runtime_version: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[CudaDevice, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class Hardware(_message.Message):
    __slots__ = ("platform", "hostname", "cpu", "cuda", "mps_available", "device", "identity", "python_version", "torch_version", "sidecar_version", "pid")
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    MPS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    PYTHON_VERSION_FIELD_NUMBER: _ClassVar[int]
    TORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIDECAR_VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    platform: str
    hostname: str
    cpu: CpuInfo
    cuda: CudaInfo
    mps_available: bool
    device: str
    identity: str
    python_version: str
    torch_version: str
    sidecar_version: str
    pid: int
    def __init__(self, platform: _Optional[str] = ..., hostname: _Optional[str] = ..., cpu: _Optional[_Union[CpuInfo, _Mapping]] = ..., cuda: _Optional[_Union[CudaInfo, _Mapping]] = ..., mps_available: _Optional[bool] = ..., device: _Optional[str] = ..., identity: _Optional[str] = ..., python_version: _Optional[str] = ..., torch_version: _Optional[str] = ..., sidecar_version: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class TelemetryRequest(_message.Message):
    __slots__ = ("memory_interval_s", "batch_window_ms")
    MEMORY_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    memory_interval_s: float
    batch_window_ms: int
    def __init__(self, memory_interval_s: _Optional[float] = ..., batch_window_ms: _Optional[int] = ...) -> None: ...

class CallSpan(_message.Message):
    __slots__ = ("phase", "op", "request_id", "duration_ns", "bytes_in", "bytes_out", "outcome", "timing")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[CallSpan.Phase]
        START: _ClassVar[CallSpan.Phase]
        STOP: _ClassVar[CallSpan.Phase]
        EXCEPTION: _ClassVar[CallSpan.Phase]
    PHASE_UNSPECIFIED: CallSpan.Phase
    START: CallSpan.Phase
    STOP: CallSpan.Phase
    EXCEPTION: CallSpan.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    phase: CallSpan.Phase
    op: str
    request_id: str
    duration_ns: int
    bytes_in: int
    bytes_out: int
    outcome: str
    timing: Timing
    def __init__(self, phase: _Optional[_Union[CallSpan.Phase, str]] = ..., op: _Optional[str] = ..., request_id: _Optional[str] = ..., duration_ns: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., outcome: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class MemorySample(_message.Message):
    __slots__ = ("rss_bytes", "arena_reserved_bytes", "arena_in_use_bytes", "leases", "gpus")
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARENA_IN_USE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    rss_bytes: int
    arena_reserved_bytes: int
    arena_in_use_bytes: int
    leases: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuMemory]
    def __init__(self, rss_bytes: _Optional[int] = ..., arena_reserved_bytes: _Optional[int] = ..., arena_in_use_bytes: _Optional[int] = ..., leases: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuMemory, _Mapping]]] = ...) -> None: ...

class GpuMemory(_message.Message):
    __slots__ = ("index", "allocated", "reserved", "free", "total")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    allocated: int
    reserved: int
    free: int
    total: int
    def __init__(self, index: _Optional[int] = ..., allocated: _Optional[int] = ..., reserved: _Optional[int] = ..., free: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class PoolEvent(_message.Message):
    __slots__ = ("event", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    event: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, event: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TelemetryEvent(_message.Message):
    __slots__ = ("time_unix_ns", "pid", "span", "memory", "pool", "batch")
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    time_unix_ns: int
    pid: int
    span: CallSpan
    memory: MemorySample
    pool: PoolEvent
    batch: _containers.RepeatedCompositeFieldContainer[TelemetryEvent]
    def __init__(self, time_unix_ns: _Optional[int] = ..., pid: _Optional[int] = ..., span: _Optional[_Union[CallSpan, _Mapping]] = ..., memory: _Optional[_Union[MemorySample, _Mapping]] = ..., pool: _Optional[_Union[PoolEvent, _Mapping]] = ..., batch: _Optional[_Iterable[_Union[TelemetryEvent, _Mapping]]] = ...) -> None: ...

class Shape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("kind", "message", "op", "request_id", "input_shapes", "input_dtypes", "dim", "has_dim", "expected", "got", "suggestion", "device", "requested_bytes", "free_bytes", "total_bytes", "allocated_bytes", "reserved_bytes", "available", "input_index", "field", "close_names", "exception_type", "traceback", "queue_depth", "limit", "exit_code", "signal", "classification", "stderr_tail", "pid", "resource", "loader", "cause", "missing_keys", "unexpected_keys", "shape_mismatches", "architecture", "session_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPES_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    HAS_DIM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    GOT_FIELD_NUMBER: _ClassVar[int]
    SUGGESTION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    INPUT_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    CLOSE_NAMES_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    LOADER_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    MISSING_KEYS_FIELD_NUMBER: _ClassVar[int]
    UNEXPECTED_KEYS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    kind: ErrorKind
    message: str
    op: str
    request_id: str
    input_shapes: _containers.RepeatedCompositeFieldContainer[Shape]
    input_dtypes: _containers.RepeatedScalarFieldContainer[str]
    dim: int
    has_dim: bool
    expected: str
    got: str
    suggestion: str
    device: str
    requested_bytes: int
    free_bytes: int
    total_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    available: _containers.RepeatedScalarFieldContainer[str]
    input_index: int
    field: str
    close_names: _containers.RepeatedScalarFieldContainer[str]
    exception_type: str
    traceback: str
    queue_depth: int
    limit: int
    exit_code: int
    signal: int
    classification: str
    stderr_tail: _containers.RepeatedScalarFieldContainer[str]
    pid: int
    resource: str
    loader: str
    cause: str
    missing_keys: _containers.RepeatedScalarFieldContainer[str]
    unexpected_keys: _containers.RepeatedScalarFieldContainer[str]
    shape_mismatches: _containers.RepeatedScalarFieldContainer[str]
    architecture: str
    session_id: str
    def __init__(self, kind: _Optional[_Union[ErrorKind, str]] = ..., message: _Optional[str] = ..., op: _Optional[str] = ..., request_id: _Optional[str] = ..., input_shapes: _Optional[_Iterable[_Union[Shape, _Mapping]]] = ..., input_dtypes: _Optional[_Iterable[str]] = ..., dim: _Optional[int] = ..., has_dim: _Optional[bool] = ..., expected: _Optional[str] = ..., got: _Optional[str] = ..., suggestion: _Optional[str] = ..., device: _Optional[str] = ..., requested_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., allocated_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., available: _Optional[_Iterable[str]] = ..., input_index: _Optional[int] = ..., field: _Optional[str] = ..., close_names: _Optional[_Iterable[str]] = ..., exception_type: _Optional[str] = ..., traceback: _Optional[str] = ..., queue_depth: _Optional[int] = ..., limit: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., classification: _Optional[str] = ..., stderr_tail: _Optional[_Iterable[str]] = ..., pid: _Optional[int] = ..., resource: _Optional[str] = ..., loader: _Optional[str] = ..., cause: _Optional[str] = ..., missing_keys: _Optional[_Iterable[str]] = ..., unexpected_keys: _Optional[_Iterable[str]] = ..., shape_mismatches: _Optional[_Iterable[str]] = ..., architecture: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...
