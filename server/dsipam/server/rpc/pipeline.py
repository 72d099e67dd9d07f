"""The call pipeline: where every IpamService call is authorised, bounded, parsed and counted.

:class:`CallWrapper` wraps each IpamService method handler once, when the service is registered
(not as a server interceptor: grpc.aio runs an interceptor's coroutine chain on every call, which
showed in the Allocate profile). For each call it

1. decides from the call's **metadata alone**, before any request byte is read, whether the
   caller may be served: with authentication on, every call gets the *guarded* handler, a
   stream-shaped handler that counts the call in flight and runs :meth:`Authorizer.authorize`
   with the call's context first and ends a refused call at once, so its request message is
   never read nor parsed (gRPC resets the stream; what the client still sends is dropped by
   HTTP/2 flow control). An allowed call then reads its one request message, within
   ``request_read_seconds`` (DEADLINE_EXCEEDED after it): a caller that opens calls and never
   sends their requests holds at most ``max_concurrent_rpcs`` slots, each that long;
2. sets the request ID (``x-request-id``, else generated) for the logs (:data:`current_call`);
3. refuses the call with UNAVAILABLE (retryable, counted) when ``max_concurrent_rpcs`` calls are
   already in flight in this process;
4. parses the request itself, so that a malformed message is INVALID_ARGUMENT, not UNKNOWN
   (messages over ``grpc.max_receive_message_length`` are refused by gRPC's C-core before
   they are buffered: RESOURCE_EXHAUSTED naming the limit);
5. records the call's metrics and access log.

When authentication is on, the service's registered-method table (grpcio's
``add_registered_method_handlers``, which skips ``service()``) is not installed, so that step 1
runs for every call; ``bench/pipeline_cost.py`` measures what that costs. With ``--insecure``
there is nothing to decide before the body: the registered table and the fast form (gRPC reads
the request before the handler runs) are used.

Method paths that the service does not have are answered UNIMPLEMENTED by gRPC and leave
nothing behind: only the service's own methods are cached.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from ..security import SERVICE_PREFIX, Authorizer, Role, required_role
from .errors import to_grpc_status

if TYPE_CHECKING:
    from ..observability import Metrics

access_log = logging.getLogger("dsipam.access")

REQUEST_ID_HEADER = "x-request-id"
AUTHORIZATION_HEADER = "authorization"
_MAX_REQUEST_ID = 128


class CallInfo:
    """What the logs know about the call being served. The request ID is the caller's
    ``x-request-id`` when it is usable, else made the first time something logs."""

    __slots__ = ("_request_id", "caller", "method")

    def __init__(self, given_request_id: str | None, method: str, caller: str = "") -> None:
        self._request_id = given_request_id
        self.method = method
        self.caller = caller

    @property
    def request_id(self) -> str:
        if self._request_id is None or not _usable_request_id(self._request_id):
            self._request_id = os.urandom(16).hex()
        return self._request_id

    def set_caller(self, caller: str) -> None:
        self.caller = caller


current_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("dsipam_call", default=None)
"""The call the current task serves (each gRPC call runs in its own context)."""


def _usable_request_id(value: str) -> bool:
    return 0 < len(value) <= _MAX_REQUEST_ID and value.isascii() and value.isprintable()


_STATUS_NAMES = {code: code.name for code in grpc.StatusCode}


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return _STATUS_NAMES[code]
    for c in grpc.StatusCode:  # an int
        if c.value[0] == code:
            return c.name
    return "UNKNOWN"


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, reason: str,
                 metadata: dict[str, str]) -> None:
    status = to_grpc_status(code, message, reason, metadata)
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class _Method:
    """The two wrapped forms of one IpamService method handler."""

    __slots__ = ("fast", "guarded", "handler", "required")

    def __init__(self, handler: Any, fast: Any, guarded: Any, required: Role | None) -> None:
        self.handler, self.fast, self.guarded, self.required = handler, fast, guarded, required


class CallWrapper:
    """Wraps every IpamService method handler once; other services (health, reflection) pass through.

    Use :meth:`registrar` in place of the server when registering a service::

        add_IpamServiceServicer_to_server(servicer, wrapper.registrar(server))
    """

    def __init__(self, authorizer: Authorizer | None, metrics: Metrics | None, *,
                 max_concurrent_rpcs: int = 0, request_read_seconds: float = 10.0) -> None:
        self.authorizer = authorizer
        self.metrics = metrics
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.request_read_seconds = request_read_seconds
        self.in_flight = 0
        if authorizer is not None and authorizer.kube is not None and metrics is not None:
            metrics.registry.register(authorizer.kube.collector())  # dsipam_kube_token_* (kube_auth.py)

    def registrar(self, server: grpc.aio.Server) -> _Registrar:
        return _Registrar(server, self)

    def wrap(self, method: str, handler: Any) -> Any:
        """The fast form of ``handler`` (the request is read by gRPC before the caller is checked)."""
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        return self._wrap(method, handler, guarded=False)

    def method(self, method: str, handler: Any) -> _Method:
        return _Method(handler, self._wrap(method, handler, guarded=False),
                       self._wrap(method, handler, guarded=True), required_role(method))

    def _wrap(self, method: str, handler: Any, *, guarded: bool) -> Any:  # grpc's RpcMethodHandler namedtuple
        name = method[len(SERVICE_PREFIX):]
        required = required_role(method)
        authorizer = self.authorizer
        metrics = self.metrics
        parse = handler.request_deserializer
        limit = self.max_concurrent_rpcs
        wrapper = self

        async def begin(context: grpc.aio.ServicerContext) -> None:
            """Request ID, the caller's check, the in-flight bound: all before the body."""
            request_id: str | None = None
            authorization: str | None = None
            for item in context.invocation_metadata() or ():
                key, value = item[0], item[1]
                if key == REQUEST_ID_HEADER and isinstance(value, str):
                    request_id = value
                elif key == AUTHORIZATION_HEADER and isinstance(value, str):
                    authorization = value
            call = CallInfo(request_id, name)
            current_call.set(call)
            if authorizer is not None and required is not None:
                await authorizer.authorize(authorization, context, method, required, call.set_caller)
            if limit and wrapper.in_flight > limit:
                await _abort(context, grpc.StatusCode.UNAVAILABLE,
                             f"server busy: more than {limit} calls in flight (max_concurrent_rpcs); retry with backoff",
                             "OVERLOADED", {"limit": "max_concurrent_rpcs", "value": str(limit)})

        async def parse_request(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            if parse is None:
                return raw
            try:
                return parse(raw)
            except (DecodeError, ValueError, TypeError) as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                             f"request: not a valid {name} request message ({type(exc).__name__})",
                             "INVALID_ARGUMENT", {})

        async def read_one(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            """The one request message of a unary call served by a guarded (stream-shaped) handler,
            within ``request_read_seconds``: a caller that opens a call and never sends its request
            holds an in-flight slot (counted against max_concurrent_rpcs) only that long."""
            try:
                raw = await asyncio.wait_for(request_iterator.__anext__(), wrapper.request_read_seconds)
            except StopAsyncIteration:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request: no request message",
                             "INVALID_ARGUMENT", {"field": "request"})
            except TimeoutError:
                await _abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"request: not received within {wrapper.request_read_seconds:g}s of the call's start "
                             "(request_read_seconds)",
                             "REQUEST_READ_TIMEOUT", {"field": "request", "limit": "request_read_seconds"})
            return await parse_request(raw, context)

        def finish(context: grpc.aio.ServicerContext, start: float, code: str | None) -> None:
            wrapper.in_flight -= 1
            code = code or _code_name(context)
            elapsed = time.perf_counter() - start
            if metrics is not None:
                metrics.observe_rpc(name, code, elapsed)
            if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                access_log.warning("%s refused: %s", name, code, extra={"fields": {"code": code}})
            elif code == "UNAVAILABLE" and access_log.isEnabledFor(logging.INFO):
                access_log.info("%s %s", name, code, extra={"fields": {"code": code}})
            elif access_log.isEnabledFor(logging.DEBUG):
                access_log.debug("%s %s", name, code, extra={"fields": {"code": code, "ms": round(elapsed * 1000, 3)}})

        def failure(exc: BaseException) -> str | None:
            if isinstance(exc, asyncio.CancelledError):
                return "CANCELLED"
            if isinstance(exc, grpc.aio.AbortError):
                return None  # the code is the context's
            return "UNKNOWN"

        if handler.request_streaming:
            # Client-streaming methods (none today): check the caller first; grpc parses the requests.
            streaming = handler.stream_unary or handler.stream_stream

            async def any_streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                wrapper.in_flight += 1
                start = time.perf_counter()
                code = None
                try:
                    await begin(context)
                    return await streaming(request_iterator, context)
                except BaseException as exc:
                    code = failure(exc)
                    raise
                finally:
                    finish(context, start, code)

            if handler.stream_unary is not None:
                return handler._replace(stream_unary=any_streaming)

            async def stream_stream_wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                wrapper.in_flight += 1
                start = time.perf_counter()
                code = None
                try:
                    await begin(context)
                    result = streaming(request_iterator, context)
                    if hasattr(result, "__aiter__"):
                        async for item in result:
                            yield item
                    else:
                        await result
                except BaseException as exc:
                    code = failure(exc)
                    raise
                finally:
                    finish(context, start, code)

            return handler._replace(stream_stream=stream_stream_wrapped)

        if not handler.response_streaming:
            inner = handler.unary_unary

            if not guarded:
                async def unary_unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
                    wrapper.in_flight += 1
                    start = time.perf_counter()
                    code = None
                    try:
                        await begin(context)
                        return await inner(await parse_request(raw, context), context)
                    except BaseException as exc:
                        code = failure(exc)
                        raise
                    finally:
                        finish(context, start, code)

                return handler._replace(unary_unary=unary_unary, request_deserializer=None)

            async def guarded_unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
                wrapper.in_flight += 1
                start = time.perf_counter()
                code = None
                try:
                    await begin(context)
                    return await inner(await read_one(request_iterator, context), context)
                except BaseException as exc:
                    code = failure(exc)
                    raise
                finally:
                    finish(context, start, code)

            return grpc.stream_unary_rpc_method_handler(
                guarded_unary, request_deserializer=None, response_serializer=handler.response_serializer)

        inner_stream = handler.unary_stream

        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            result = inner_stream(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a coroutine that writes with context.write
                await result

        if not guarded:
            async def unary_stream(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                wrapper.in_flight += 1
                start = time.perf_counter()
                code = None
                try:
                    await begin(context)
                    async for item in stream_out(await parse_request(raw, context), context):
                        yield item
                except BaseException as exc:
                    code = failure(exc)
                    raise
                finally:
                    finish(context, start, code)

            return handler._replace(unary_stream=unary_stream, request_deserializer=None)

        async def guarded_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            wrapper.in_flight += 1
            start = time.perf_counter()
            code = None
            try:
                await begin(context)
                async for item in stream_out(await read_one(request_iterator, context), context):
                    yield item
            except BaseException as exc:
                code = failure(exc)
                raise
            finally:
                finish(context, start, code)

        return grpc.stream_stream_rpc_method_handler(
            guarded_stream, request_deserializer=None, response_serializer=handler.response_serializer)


class _Registrar:
    """Stands in for the server while generated code registers a service: the handlers it
    adds reach the server wrapped. With authentication on, the registered-method table is left
    out so that every call passes :meth:`_WrappedGeneric.service` (the check before the body)."""

    def __init__(self, server: grpc.aio.Server, wrapper: CallWrapper) -> None:
        self._server, self._wrapper = server, wrapper

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h, self._wrapper) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        if self._wrapper.authorizer is not None:
            return
        self._server.add_registered_method_handlers(
            service, {name: self._wrapper.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """Chooses, per call and from its metadata, the fast or the guarded form of the method."""

    def __init__(self, inner: grpc.GenericRpcHandler, wrapper: CallWrapper) -> None:
        self._inner, self._wrapper = inner, wrapper
        self._authorizer = wrapper.authorizer
        # Only methods the inner handler serves are kept: at most the service's method count.
        self._cache: dict[str, _Method] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        entry = self._cache.get(method)
        if entry is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None  # UNIMPLEMENTED; nothing is remembered about made-up paths
            if not method.startswith(SERVICE_PREFIX):
                return handler
            entry = self._cache[method] = self._wrapper.method(method, handler)
        if self._authorizer is None or entry.required is None:
            return entry.fast
        # Every call of an authenticated service takes the guarded form, a known token's too: the
        # call is counted in flight and its caller checked before its request is read, and the read
        # is bounded (request_read_seconds). With the fast form gRPC waits for the request before
        # the handler runs, uncounted and without limit: a token holder could park thousands of
        # calls that never send one (an outside review held 18,000: +330 MB).
        return entry.guarded


__all__ = [
    "AUTHORIZATION_HEADER",
    "REQUEST_ID_HEADER",
    "CallInfo",
    "CallWrapper",
    "current_call",
]
