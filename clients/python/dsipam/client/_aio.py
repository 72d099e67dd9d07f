"""The asyncio client (``grpc.aio``)."""

# `timeout` is the gRPC deadline of a call, retries included, not an asyncio timeout:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, cast

import grpc
from dsipam.v1 import ipam_pb2 as pb

from . import _base as b
from . import _convert as c
from ._channel import ChannelOptions, TlsConfig
from ._errors import IpamError, PoolAlreadyExists, PoolNotFound, error_from_rpc
from ._retry import Deadline, RetryPolicy
from ._types import (
    Address,
    AddressLike,
    AllocateResult,
    Allocation,
    Family,
    NetworkLike,
    Page,
    Policy,
    Pool,
    Range,
)


class AsyncIpamClient:
    """An asyncio client of ``dsipam.v1.IpamService``; one coroutine per RPC.

    >>> async with AsyncIpamClient("127.0.0.1:50051") as ipam:
    ...     (await ipam.allocate("pods", "c1/eth0", policy="require")).allocation.ipv4

    Create it inside the event loop that uses it.

    Args:
        target: ``host:port``, ``unix:///path``, a comma-separated list of IP ``host:port``
            (balanced round-robin), or any gRPC target URI. None: ``DSIPAM_TARGET``, else
            ``127.0.0.1:50051``.
        tls: a :class:`TlsConfig` (CA, client certificate and key from files), True for TLS
            with the system roots, or None/False for plaintext.
        token: a bearer token sent as ``authorization: Bearer ...`` with every call.
        token_file: a file holding the token, read before every call (rotated tokens work).
        timeout: the default deadline of a call in seconds, retries included (None: none).
        retry: the :class:`RetryPolicy`; by default UNAVAILABLE and ABORTED are retried with
            exponential backoff until the deadline.
        lb_policy: a gRPC load-balancing policy name; ``round_robin`` is the default when the
            target lists several addresses.
        options: extra gRPC channel arguments.
        metadata: metadata sent with every call.
        interceptors: ``grpc.aio`` client interceptors (they see every attempt).

    Every method takes ``timeout`` to override the default deadline for that call, and raises
    an :class:`IpamError` subclass on failure.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        tls: TlsConfig | bool | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        timeout: float | None = b.DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        lb_policy: str | None = None,
        options: ChannelOptions | None = None,
        metadata: Sequence[tuple[str, str]] | Mapping[str, str] | None = None,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self._conn = b.connection(
            target, tls=tls, token=token, token_file=token_file, timeout=timeout, retry=retry,
            lb_policy=lb_policy, options=options, metadata=metadata,
        )
        if self._conn.tls is not None:
            self._channel = grpc.aio.secure_channel(
                self._conn.target, self._conn.tls.credentials(), options=self._conn.options,
                interceptors=list(interceptors) or None,
            )
        else:
            self._channel = grpc.aio.insecure_channel(
                self._conn.target, options=self._conn.options, interceptors=list(interceptors) or None
            )
        self._stubs: dict[str, Any] = {}
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncIpamClient:
        """A client configured from ``DSIPAM_TARGET``, ``DSIPAM_CA_FILE``, ``DSIPAM_CERT_FILE``,
        ``DSIPAM_KEY_FILE``, ``DSIPAM_SERVER_NAME``, ``DSIPAM_TLS``, ``DSIPAM_TOKEN``,
        ``DSIPAM_TOKEN_FILE`` and ``DSIPAM_TIMEOUT``; keyword arguments win."""
        return cls(**{**b.env_settings(), **overrides})

    @property
    def target(self) -> str:
        """The gRPC target this client talks to."""
        return self._conn.target

    # -- lifecycle ----------------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel; calls still in flight after ``grace`` seconds are cancelled.
        Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            await self._channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the call loop ------------------------------------------------------------------------

    async def _invoke(self, method: b.Method[b.Req, b.Resp], request: b.Req, timeout: float | None) -> b.Resp:
        if self._closed:
            raise ValueError("AsyncIpamClient is closed")
        stub = self._stubs.get(method.name)
        if stub is None:
            stub = self._stubs[method.name] = self._channel.unary_unary(
                method.path, request_serializer=b.serialize, response_deserializer=method.deserialize
            )
        deadline = Deadline(self._conn.timeout if timeout is None else timeout)
        policy = self._conn.retry
        attempt = 0
        while True:
            attempt += 1
            left = deadline.remaining()
            try:
                return cast(b.Resp, await stub(request, timeout=left, metadata=self._conn.call_metadata()))
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, attempts=attempt)
                if not policy.should_retry(err.code, attempt):
                    raise err from exc
                pause = deadline.pause(policy.backoff(attempt))
                if pause is None:
                    raise err from exc
            b.log.debug("%s failed with %s (attempt %d); retrying in %.2fs", method.name, err.code.name, attempt, pause)
            await asyncio.sleep(pause)

    # -- pools --------------------------------------------------------------------------------

    async def create_pool(
        self,
        name: str,
        ranges: Iterable[Range | NetworkLike] | Range | NetworkLike,
        *,
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Pool:
        """Creates a pool and returns it with its usage.

        Args:
            name: a lowercase DNS label of 1-63 characters.
            ranges: :class:`Range` objects or plain CIDRs, of one or both families.
            labels: free-form key/value labels.

        Raises:
            PoolAlreadyExists: the name is taken (by a different pool, when the call was retried).
            InvalidArgument: a bad name, CIDR, address, or overlapping ranges.
        """
        request, built = c.create_pool(name, ranges, labels)
        try:
            return c.pool_from_pb(await self._invoke(b.CREATE_POOL, request, timeout))
        except PoolAlreadyExists as exc:
            if exc.attempts <= 1:
                raise
            existing = await self.get_pool(name, timeout=timeout)  # an earlier attempt may have created it
            if c.same_pool(existing, built, labels):
                return existing
            raise

    async def get_pool(self, name: str, *, timeout: float | None = None) -> Pool:
        """Returns a pool with its usage per family.

        Raises:
            PoolNotFound: no pool has that name.
        """
        return c.pool_from_pb(await self._invoke(b.GET_POOL, pb.GetPoolRequest(name=name), timeout))

    async def list_pools(self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None) -> Page[Pool]:
        """Returns one page of pools ordered by name (``page_size`` 0 means the server's 100).
        See :meth:`iter_pools` for all of them."""
        request = pb.ListPoolsRequest(page_size=page_size, page_token=page_token)
        return c.pools_page(await self._invoke(b.LIST_POOLS, request, timeout))

    async def iter_pools(self, *, page_size: int = 0, timeout: float | None = None) -> AsyncIterator[Pool]:
        """Yields every pool, fetching one page at a time (``timeout`` applies to each page)."""
        token = ""
        while True:
            page = await self.list_pools(page_size=page_size, page_token=token, timeout=timeout)
            for item in page:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def delete_pool(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        """Deletes a pool. With ``force``, its allocations are released with it.

        Raises:
            PoolNotFound: no pool has that name (not raised when a retried call had deleted it).
            PoolHasAllocations: the pool holds allocations and ``force`` is False.
        """
        try:
            await self._invoke(b.DELETE_POOL, pb.DeletePoolRequest(name=name, force=force), timeout)
        except PoolNotFound as exc:
            if exc.attempts <= 1:
                raise

    # -- allocations --------------------------------------------------------------------------

    async def allocate(
        self,
        pool: str,
        owner: str,
        *,
        policy: Policy | str | None = None,
        families: Iterable[Family | str | int] | Family | str | None = None,
        addresses: Iterable[AddressLike] | AddressLike = (),
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AllocateResult:
        """Allocates addresses for ``owner``: a pair is taken whole or not at all.

        Idempotent per (pool, owner): calling again returns what the owner holds, with
        ``created=False``, so a retried or repeated call never takes a second address.

        Args:
            pool: the pool's name.
            owner: the key of the attachment, 1-253 printable ASCII characters such as
                ``"<containerID>/<ifname>"``.
            policy: ``"single"`` (the default), ``"prefer"`` or ``"require"`` (dual stack), or a
                :class:`Policy`.
            families: the families in order, the first being the primary; None for the pool's order.
            addresses: specific addresses to take, at most one per family.
            attributes: key/value data stored with the allocation.

        Raises:
            PoolNotFound, PoolExhausted, AddressInUse, FamilyNotInPool, OwnerHoldsOtherAddress,
            InvalidArgument.
        """
        request = c.allocate(pool, owner, policy, families, addresses, attributes)
        return c.allocate_result(await self._invoke(b.ALLOCATE, request, timeout))

    async def release(
        self,
        pool: str,
        owner: str,
        *,
        families: Iterable[Family | str | int] | Family | str | None = None,
        timeout: float | None = None,
    ) -> tuple[Address, ...]:
        """Releases what ``owner`` holds (every family, or the ones named) and returns it.

        Idempotent: releasing an owner that holds nothing succeeds and returns ``()``.
        """
        request = pb.ReleaseRequest(pool=pool, owner=owner, ip_families=c.families(families))
        return tuple(c.address_from_pb(a) for a in (await self._invoke(b.RELEASE, request, timeout)).released)

    async def get_allocation(self, pool: str, owner: str, *, timeout: float | None = None) -> Allocation:
        """Returns what ``owner`` holds in ``pool``.

        Raises:
            AllocationNotFound: the owner holds nothing there.
            PoolNotFound: the pool does not exist.
        """
        request = pb.GetAllocationRequest(pool=pool, owner=owner)
        return c.allocation_from_pb(await self._invoke(b.GET_ALLOCATION, request, timeout))

    async def list_allocations(
        self, pool: str, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> Page[Allocation]:
        """Returns one page of a pool's allocations ordered by owner (``page_size`` 0 means 100).
        See :meth:`iter_allocations` for all of them."""
        request = pb.ListAllocationsRequest(pool=pool, page_size=page_size, page_token=page_token)
        return c.allocations_page(await self._invoke(b.LIST_ALLOCATIONS, request, timeout))

    async def iter_allocations(
        self, pool: str, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Allocation]:
        """Yields every allocation of a pool, one page at a time (``timeout`` applies to each page)."""
        token = ""
        while True:
            page = await self.list_allocations(pool, page_size=page_size, page_token=token, timeout=timeout)
            for item in page:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def garbage_collect(
        self,
        pool: str,
        valid_owners: Iterable[str],
        *,
        grace: float | dt.timedelta | None = None,
        timeout: float | None = None,
    ) -> tuple[Allocation, ...]:
        """Releases every allocation of ``pool`` whose owner is not in ``valid_owners`` and that
        is older than ``grace`` (seconds or a timedelta; None: the server's 60 s), and returns
        what was released."""
        request = c.gc_request(pool, valid_owners, grace)
        response = await self._invoke(b.GARBAGE_COLLECT, request, timeout)
        return tuple(c.allocation_from_pb(a) for a in response.released)


__all__ = ["AsyncIpamClient", "IpamError"]
