"""Server reflection that also resolves method and enum-value symbols.

The stock ``grpc_reflection`` servicer answers ``file_containing_symbol`` with
``DescriptorPool.FindFileContainingSymbol``, which knows services, messages,
fields, enums and top-level enum values but not a service's methods
(``dsipam.v1.IpamService.Allocate``) nor an enum value named through its enum
(``dsipam.v1.IpFamily.IP_FAMILY_IPV4``). Clients such as ghz and grpcurl ask
for exactly those symbols, and got NOT_FOUND ("Symbol not found").

:class:`ReflectionServicer` resolves such a symbol to the file of its parent
(the service or the enum) when the parent really declares that member, and
keeps answering NOT_FOUND for anything else.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as _StockReflectionServicer
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error

SERVICE_NAME: str = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def find_file_containing_symbol(pool: descriptor_pool.DescriptorPool, symbol: str) -> FileDescriptor:
    """The file that declares ``symbol``, including methods and enum values named through their parent.

    Raises :class:`KeyError` when no file declares it.
    """
    symbol = symbol.lstrip(".")
    try:
        return pool.FindFileContainingSymbol(symbol)
    except KeyError:
        pass
    parent, _, member = symbol.rpartition(".")
    if parent and member:
        try:
            service = pool.FindServiceByName(parent)
        except KeyError:
            service = None
        if service is not None and member in service.methods_by_name:
            return service.file
        try:
            enum = pool.FindEnumTypeByName(parent)
        except KeyError:
            enum = None
        if enum is not None and member in enum.values_by_name:
            return enum.file
    raise KeyError(f"symbol not found: {symbol}")


class ReflectionServicer(_StockReflectionServicer):
    """grpc.aio reflection (v1alpha) whose symbol look-up also finds methods and enum values."""

    def _file_containing_symbol(self, request, fully_qualified_name):  # type: ignore[no-untyped-def]
        try:
            descriptor = find_file_containing_symbol(self._pool, fully_qualified_name)
        except KeyError:
            return _not_found_error(request)
        return _file_descriptor_response(descriptor, request)


def enable_server_reflection(
    service_names: Iterable[str], server: grpc.aio.Server, pool: descriptor_pool.DescriptorPool | None = None
) -> ReflectionServicer:
    """Adds :class:`ReflectionServicer` to ``server``; a drop-in for the stock ``enable_server_reflection``."""
    servicer = ReflectionServicer(service_names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    return servicer


__all__ = ["SERVICE_NAME", "ReflectionServicer", "enable_server_reflection", "find_file_containing_symbol"]
