"""Load, Unload, ListResources and CloseSession on both transports.

`StateService` answers the four requests on a server core in neutral records (the fields of
`sidecar.v1.ResourceInfo`, `UnloadResponse`, `ResourceList`, `CloseSessionResponse`); `StateRpcs` is
the gRPC side (mixed into the Sidecar servicer) and `state_request` the port side
(`{:load, id, name, loader, kwargs}`, `{:unload, id, name}`, `{:list_resources, id}`,
`{:close_session, id, session_id}`). Loads run on the transport's call threads (a loader may take
seconds), the others are quick. Once the worker is shutting down a load is refused (CANCELLED).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc

from sidecar.errors import Cancelled, InvalidArgument, SidecarError, shorten
from sidecar.protocol import grpc_codec
from sidecar.protocol.port_codec import attrs_from_term, record_to_term, text
from sidecar.v1 import sidecar_pb2 as pb
from sidecar.worker.server_core import ServerCore, unexpected

log = logging.getLogger(__name__)

# The port's request tags of this module, and the arity of each (the tag and the id included).
PORT_TERMS = {"load": 5, "unload": 3, "list_resources": 2, "close_session": 3}


class StateService:
    """The requests on resources and sessions, transport-free."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core
        self.rt = core.runtime

    def load(self, name: Any, loader: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A `ResourceInfo` record of what is now resident as `name`."""
        if self.core.closing:
            raise Cancelled(f"worker is shutting down ({self.core.closing}); load of {shorten(name)} refused")
        if not isinstance(loader, str):
            raise InvalidArgument(f"loader must be a string, got {shorten(loader)}", field="loader")
        return self.rt.load(name, loader, kwargs)

    def unload(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"unload takes a resource name, got {shorten(name)}", field="name")
        return self.rt.unload(name)

    def list_resources(self) -> dict[str, Any]:
        return self.rt.list_resources()

    def close_session(self, session_id: Any) -> dict[str, Any]:
        if not isinstance(session_id, str) or not session_id:
            raise InvalidArgument(f"close_session takes a session id, got {shorten(session_id)}",
                                  field="session_id")
        return {"closed": bool(self.rt.close_session(session_id))}


# ---------------------------------------------------------------------------------------------------
# gRPC


class StateRpcs:
    """The Sidecar service's Load / Unload / ListResources / CloseSession (a mixin of the servicer,
    which sets `_core`)."""

    _core: ServerCore

    def _state(self, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SidecarError as err:
            context.abort_with_status(grpc_codec.error_to_status(err))
        except Exception as exc:  # a bug of ours: still a structured answer
            log.exception("resource/session request failed")
            context.abort_with_status(grpc_codec.error_to_status(unexpected(exc)))

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.LoadResponse:
        def run() -> pb.LoadResponse:
            kwargs = {k: grpc_codec.read_value(v) for k, v in request.kwargs.items()}
            info = StateService(self._core).load(request.name, request.loader, kwargs)
            return grpc_codec.dict_to_message({"resource": info}, pb.LoadResponse())
        return self._state(context, run)  # type: ignore[no-any-return]

    def Unload(self, request: pb.UnloadRequest, context: grpc.ServicerContext) -> pb.UnloadResponse:
        return self._state(context, lambda: grpc_codec.dict_to_message(  # type: ignore[no-any-return]
            StateService(self._core).unload(request.name), pb.UnloadResponse()))

    def ListResources(self, request: pb.ListResourcesRequest, context: grpc.ServicerContext) -> pb.ResourceList:
        return self._state(context, lambda: grpc_codec.dict_to_message(  # type: ignore[no-any-return]
            StateService(self._core).list_resources(), pb.ResourceList()))

    def CloseSession(self, request: pb.CloseSessionRequest,
                     context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        return self._state(context, lambda: grpc_codec.dict_to_message(  # type: ignore[no-any-return]
            StateService(self._core).close_session(request.session_id), pb.CloseSessionResponse()))


# ---------------------------------------------------------------------------------------------------
# the Erlang port


def state_request(server: Any, tag: str, req: tuple[Any, ...], req_id: Any) -> bool:
    """Answers a port request of this module (False: `tag` is none of PORT_TERMS, or the arity is
    not its). `server` is the `StdioServer` (its `reply`, `send_error`, `calls`, `control`)."""
    if PORT_TERMS.get(tag) != len(req):
        return False
    service = StateService(server.core)
    if tag == "load":
        name, loader = text(req[2], "name"), text(req[3], "loader")
        kwargs = attrs_from_term(req[4] if req[4] is not None else {})
        _answer(server, server.calls, req_id, lambda: record_to_term("ResourceInfo",
                                                                     service.load(name, loader, kwargs)))
    elif tag == "unload":
        name = text(req[2], "name")
        _answer(server, server.control, req_id, lambda: record_to_term("UnloadResponse", service.unload(name)))
    elif tag == "list_resources":
        _answer(server, server.control, req_id, lambda: record_to_term("ResourceList", service.list_resources()))
    else:
        session_id = text(req[2], "session_id")
        _answer(server, server.control, req_id,
                lambda: record_to_term("CloseSessionResponse", service.close_session(session_id)))
    return True


def _answer(server: Any, executor: Any, req_id: Any, fn: Callable[[], Any]) -> None:
    def run() -> None:
        try:
            server.reply(req_id, "ok", fn())
        except SidecarError as err:
            server.send_error(req_id, err)
        except Exception as exc:  # a bug of ours: still an answer
            log.exception("resource/session request failed")
            server.send_error(req_id, unexpected(exc))
    executor.submit(run)
