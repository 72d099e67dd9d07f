"""The asyncio client (``grpc.aio``)."""

# `timeout` is the gRPC deadline of a call, retries included, not an asyncio timeout:
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, cast

import grpc

from dsipam.v1 import ipam_pb2 as pb

from . import _base as b
from . import _convert as c
from ._channel import ChannelOptions, TlsConfig
from ._errors import (
    DeadlineExceeded,
    InvalidArgument,
    IpamError,
    PoolAlreadyExists,
    PoolNotFound,
    RangeNotFound,
    error_from_rpc,
)
from ._retry import Deadline, RetryPolicy
from ._stream import AsyncStream, AsyncWatchStream
from ._types import (
    Address,
    AddressLike,
    AllocateResult,
    Allocation,
    Block,
    Family,
    MigrationProgress,
    NetworkLike,
    NodeAffinity,
    Page,
    Policy,
    Pool,
    Range,
    ReleaseNodeResult,
    WatchEvent,
    parse_network,
)


async def _read_within(call: Any, wait: float | None, attempts: int) -> Any:
    """The call's next message, or None at its end; a wait longer than ``wait`` seconds cancels the
    call and raises :class:`DeadlineExceeded` (None: no limit)."""
    if wait is None:
        message = await call.read()
    else:
        try:
            if wait <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(call.read(), wait)
        except TimeoutError:
            call.cancel()
            raise DeadlineExceeded(f"no message within {wait:.3g}s (the call's deadline)", attempts=attempts) from None
    return None if message is grpc.aio.EOF else message


def _ended_by_cancel(stream: AsyncStream[Any]) -> bool:
    """Whether a CancelledError comes from ``stream.cancel()`` (not from cancelling the task)."""
    task = asyncio.current_task()
    return stream.cancelled and (task is None or task.cancelling() == 0)


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

    # -- server streams -----------------------------------------------------------------------

    async def _open(self, method: b.Method[b.Req, b.Resp], request: b.Req, wait: float | None,
                    stream: AsyncStream[Any], attempt: int) -> tuple[Any, b.Resp | None]:
        """One attempt: starts the call and waits up to ``wait`` seconds for its first message
        (None when the stream ended without one). Raises grpc.RpcError or DeadlineExceeded."""
        if self._closed:
            raise ValueError("AsyncIpamClient is closed")
        stub = self._stubs.get(method.name)
        if stub is None:
            stub = self._stubs[method.name] = self._channel.unary_stream(
                method.path, request_serializer=b.serialize, response_deserializer=method.deserialize
            )
        # No gRPC deadline: a stream may outlive its start; waits are bounded per message instead.
        call = stub(request, metadata=self._conn.call_metadata())
        stream._attach(call)
        return call, await _read_within(call, wait, attempt)

    async def _start(self, method: b.Method[b.Req, b.Resp], request: b.Req, timeout: float | None,
                     stream: AsyncStream[Any]) -> tuple[Any, b.Resp | None, int] | None:
        """Starts a stream with retries until its first message, within ``timeout`` (None: the
        client's); returns (call, first message, attempts), or None when the stream was cancelled."""
        deadline = Deadline(self._conn.timeout if timeout is None else timeout)
        policy = self._conn.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                call, first = await self._open(method, request, deadline.remaining(), stream, attempt)
                return call, first, attempt
            except asyncio.CancelledError:
                if _ended_by_cancel(stream):
                    return None
                raise
            except grpc.RpcError as exc:
                if stream.cancelled:
                    return None
                err = error_from_rpc(exc, attempts=attempt)
                if not policy.should_retry(err.code, attempt):
                    raise err from exc
                pause = deadline.pause(policy.backoff(attempt))
                if pause is None:
                    raise err from exc
            b.log.debug("%s failed with %s (attempt %d); retrying in %.2fs", method.name, err.code.name, attempt, pause)
            if not await stream._pause(pause):
                return None

    async def _watch_body(self, request: pb.WatchAllocationsRequest, timeout: float | None,
                          stream: AsyncWatchStream) -> AsyncGenerator[WatchEvent, None]:
        started = await self._start(b.WATCH_ALLOCATIONS_STREAM, request, timeout, stream)
        if started is None:
            return
        call, message, attempts = started
        try:
            first = True
            while message is not None:
                event = c.watch_event(message, request.resume_token, first)
                first = False
                stream.resume_token = message.resume_token if event is None else event.resume_token
                if event is not None:
                    yield event
                message = await _read_within(call, None, attempts)
        except asyncio.CancelledError:
            if _ended_by_cancel(stream):
                return
            raise
        except grpc.RpcError as exc:
            if stream.cancelled:
                return
            raise error_from_rpc(exc, attempts=attempts) from exc
        finally:
            call.cancel()

    async def _follow_body(self, pool: str, timeout: float | None, max_outage: float | None,
                           stream: AsyncWatchStream) -> AsyncGenerator[WatchEvent, None]:
        policy = self._conn.retry
        wait = self._conn.timeout if timeout is None else timeout
        failures = 0
        connected = False
        outage: Deadline | None = None
        while not stream.cancelled:
            request = pb.WatchAllocationsRequest(pool=pool, resume_token=stream.resume_token)
            call = None
            try:
                call, message = await self._open(b.WATCH_ALLOCATIONS_STREAM, request, wait, stream, failures + 1)
                if connected:
                    stream.resumes += 1
                    b.log.info("watch of pool %s resumed after %d failed attempt(s)", pool, failures)
                failures, outage, connected = 0, None, True
                first = True
                while message is not None:
                    event = c.watch_event(message, request.resume_token, first)
                    first = False
                    stream.resume_token = message.resume_token if event is None else event.resume_token
                    if event is not None:
                        yield event
                    message = await _read_within(call, None, 1)
                err: IpamError | None = None  # the server ended the stream: watch again from the token
            except asyncio.CancelledError:
                if _ended_by_cancel(stream):
                    return
                raise
            except grpc.RpcError as exc:
                if stream.cancelled:
                    return
                err = error_from_rpc(exc, attempts=failures + 1)
                if err.code not in policy.codes:
                    raise err from exc
            except DeadlineExceeded as exc:  # the server did not answer in time: try again
                err = exc
            finally:
                if call is not None:
                    call.cancel()
            failures += 1
            if outage is None:
                outage = Deadline(max_outage)
            pause = outage.pause(policy.backoff(failures))
            if pause is None and err is not None:
                raise err
            b.log.info("watch of pool %s interrupted (%s); resuming in %.2fs from its last token", pool,
                       err.code.name if err is not None else "stream ended", pause or 0.0)
            if not await stream._pause(pause or 0.0):
                return

    # -- pools --------------------------------------------------------------------------------

    async def create_pool(
        self,
        name: str,
        ranges: Iterable[Range | NetworkLike] | Range | NetworkLike,
        *,
        labels: Mapping[str, str] | None = None,
        cooldown: float | dt.timedelta | None = None,
        node_affinity: NodeAffinity | str | None = None,
        network: str = "",
        timeout: float | None = None,
    ) -> Pool:
        """Creates a pool and returns it with its usage.

        Args:
            name: a lowercase DNS label of 1-63 characters.
            ranges: :class:`Range` objects or plain CIDRs, of one or both families.
            labels: free-form key/value labels.
            cooldown: how long a released address waits before it is handed out again, in
                seconds or as a timedelta (0 disables it; at most 24 h). None: the server's 30 s.
            node_affinity: ``"borrow"`` (the default) or ``"strict"``, or a :class:`NodeAffinity`:
                whether a node with no free block may take an address from another node's block.
            network: the address space ("" the default network; else 1-128 of a-z, 0-9, '-', '.').
                Pools of one network never overlap; pools of different networks may.

        Raises:
            PoolAlreadyExists: the name is taken (by a different pool, when the call was retried).
            InvalidArgument: a bad name, CIDR, address, cooldown or network, overlapping ranges, or a
                range that pods cannot hold (loopback, multicast, link-local, documentation, ...).
            FailedPrecondition: a range overlaps a range of another pool in the same network
                (reason ``POOLS_OVERLAP``; the message names that pool and its range).
        """
        request, built = c.create_pool(name, ranges, labels, cooldown, node_affinity, network)
        try:
            return c.pool_from_pb(await self._invoke(b.CREATE_POOL, request, timeout))
        except PoolAlreadyExists as exc:
            if exc.attempts <= 1:
                raise
            existing = await self.get_pool(name, timeout=timeout)  # an earlier attempt may have created it
            if c.same_pool(existing, request, built):
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

    async def update_pool(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        cooldown: float | dt.timedelta | None = None,
        node_affinity: NodeAffinity | str | None = None,
        timeout: float | None = None,
    ) -> Pool:
        """Changes the settings of a live pool and returns it; only the arguments given change.
        See :meth:`IpamClient.update_pool`."""
        request = c.update_pool(name, labels, cooldown, node_affinity)
        return c.pool_from_pb(await self._invoke(b.UPDATE_POOL, request, timeout))

    async def reserve_addresses(
        self,
        pool: str,
        addresses: Iterable[AddressLike | NetworkLike] | AddressLike | NetworkLike,
        *,
        force: bool = False,
        timeout: float | None = None,
    ) -> Pool:
        """Reserves addresses or CIDRs of a live pool (never handed out) and returns the pool.
        See :meth:`IpamClient.reserve_addresses`."""
        request = pb.ReserveAddressesRequest(pool=pool, addresses=c.networks(addresses), force=force)
        return c.pool_from_pb(await self._invoke(b.RESERVE_ADDRESSES, request, timeout))

    async def unreserve_addresses(
        self,
        pool: str,
        addresses: Iterable[AddressLike | NetworkLike] | AddressLike | NetworkLike,
        *,
        timeout: float | None = None,
    ) -> Pool:
        """Removes reservations made by :meth:`reserve_addresses` and returns the pool.
        See :meth:`IpamClient.unreserve_addresses`."""
        request = pb.UnreserveAddressesRequest(pool=pool, addresses=c.networks(addresses))
        try:
            return c.pool_from_pb(await self._invoke(b.UNRESERVE_ADDRESSES, request, timeout))
        except InvalidArgument as exc:
            if exc.attempts <= 1:
                raise
            current = await self.get_pool(pool, timeout=timeout)  # an earlier attempt may have removed them
            if c.holds_none_of(current, request.addresses):
                return current
            raise

    async def add_pool_range(self, pool: str, range: Range | NetworkLike, *, timeout: float | None = None) -> Pool:
        """Adds a range (a :class:`Range` or a CIDR) to a live pool and returns the pool.
        See :meth:`IpamClient.add_pool_range`."""
        request = c.add_range(pool, range)
        try:
            return c.pool_from_pb(await self._invoke(b.ADD_POOL_RANGE, request, timeout))
        except InvalidArgument as exc:
            if exc.attempts <= 1:
                raise
            current = await self.get_pool(pool, timeout=timeout)  # an earlier attempt may have added it
            if c.has_range(current, request):
                return current
            raise

    async def remove_pool_range(self, pool: str, cidr: NetworkLike, *, timeout: float | None = None) -> Pool:
        """Removes the range with this CIDR from a live pool and returns the pool.
        See :meth:`IpamClient.remove_pool_range`."""
        net = parse_network(cidr, "cidr")
        request = pb.RemovePoolRangeRequest(pool=pool, cidr=str(net))
        try:
            return c.pool_from_pb(await self._invoke(b.REMOVE_POOL_RANGE, request, timeout))
        except RangeNotFound as exc:
            if exc.attempts <= 1:
                raise
            current = await self.get_pool(pool, timeout=timeout)  # an earlier attempt may have removed it
            if all(r.cidr != net for r in current.ranges):
                return current
            raise

    def migrate_pool(
        self,
        pool: str,
        *,
        policy: Policy | str = Policy.PREFER_DUAL_STACK,
        batch_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncStream[MigrationProgress]:
        """Gives every owner of the pool the families ``policy`` asks for, in batches; returns an
        async iterator of :class:`MigrationProgress`, one per batch, the last one being the total.

        >>> async for progress in ipam.migrate_pool("pods"):
        ...     print(progress.processed, "of", progress.total)

        Not a coroutine: the migration starts with the first iteration, or at once with
        ``stream = await ipam.migrate_pool(...)`` (starting errors such as :class:`PoolNotFound`
        are raised there). Arguments, retries and failures as :meth:`IpamClient.migrate_pool`.
        """
        request = c.migrate_request(pool, policy, batch_size)
        wait = self._conn.timeout if timeout is None else timeout

        async def body(stream: AsyncStream[MigrationProgress]) -> AsyncGenerator[MigrationProgress, None]:
            started = await self._start(b.MIGRATE_POOL_STREAM, request, timeout, stream)
            if started is None:
                return
            call, message, attempts = started
            try:
                while message is not None:
                    yield c.progress_from_pb(message)
                    message = await _read_within(call, wait, attempts)
            except asyncio.CancelledError:
                if _ended_by_cancel(stream):
                    return
                raise
            except grpc.RpcError as exc:
                if stream.cancelled:
                    return
                raise error_from_rpc(exc, attempts=attempts) from exc
            finally:
                call.cancel()

        return AsyncStream(body)

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
        node: str | None = None,
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
            node: the node the owner runs on (a DNS name): addresses then come from blocks
                affine to that node (see :meth:`list_blocks`). None: no affinity.

        Raises:
            PoolNotFound, PoolExhausted (also for a node with no free block when the pool's
            affinity is strict), AddressInUse, AddressInCooldown, FamilyNotInPool,
            OwnerHoldsOtherAddress, InvalidArgument.
        """
        request = c.allocate(pool, owner, policy, families, addresses, attributes, node)
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
        self,
        pool: str,
        *,
        selector: Mapping[str, str] | None = None,
        family: Family | str | int | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> Page[Allocation]:
        """Returns one page of a pool's allocations ordered by owner (``page_size`` 0 means 100).
        See :meth:`iter_allocations` for all of them.

        Args:
            selector: only allocations whose attributes contain every one of these pairs.
            family: only allocations that hold an address of this family.
        """
        request = c.list_allocations(pool, page_size, page_token, selector, family)
        return c.allocations_page(await self._invoke(b.LIST_ALLOCATIONS, request, timeout))

    async def iter_allocations(
        self,
        pool: str,
        *,
        selector: Mapping[str, str] | None = None,
        family: Family | str | int | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Allocation]:
        """Yields every allocation of a pool (those matching ``selector`` and ``family``, as
        :meth:`list_allocations`), one page at a time (``timeout`` applies to each page)."""
        token = ""
        while True:
            page = await self.list_allocations(pool, selector=selector, family=family, page_size=page_size,
                                               page_token=token, timeout=timeout)
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
        node: str | None = None,
        selector: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[Allocation, ...]:
        """Releases every allocation of ``pool`` whose owner is not in ``valid_owners`` and that
        is older than ``grace`` (seconds or a timedelta; None: the server's 60 s), and returns
        what was released.

        ``node`` confines it to that node's allocations and ``selector`` to those whose
        attributes contain every one of its pairs. A shim's GC is always confined to its own
        node (``node`` None or its node; another node is :class:`PermissionDenied`)."""
        request = c.gc_request(pool, valid_owners, grace, node, selector)
        response = await self._invoke(b.GARBAGE_COLLECT, request, timeout)
        return tuple(c.allocation_from_pb(a) for a in response.released)

    # -- watching -------------------------------------------------------------------------------

    def watch_allocations(
        self, pool: str, resume_token: str | None = None, *, timeout: float | None = None
    ) -> AsyncWatchStream:
        """Streams the pool's allocate and release events; returns an async iterator of
        :class:`WatchEvent` (an :class:`AsyncWatchStream`).

        >>> async with ipam.watch_allocations("pods") as events:
        ...     async for event in events:
        ...         print(event.type, event.owner, event.addresses)

        Not a coroutine: the watch starts with the first iteration, or at once with
        ``events = await ipam.watch_allocations(...)``. Arguments, retries and failures as
        :meth:`IpamClient.watch_allocations`.
        """
        request = pb.WatchAllocationsRequest(pool=pool, resume_token=resume_token or "")
        return AsyncWatchStream(lambda stream: self._watch_body(request, timeout, stream),
                                resume_token=request.resume_token)

    def follow_allocations(
        self,
        pool: str,
        resume_token: str | None = None,
        *,
        bookmarks: bool = False,
        max_outage: float | None = None,
        timeout: float | None = None,
    ) -> AsyncWatchStream:
        """A watch that resumes by itself from the last token when the server goes away (a
        controller's watch loop); returns an async iterator of :class:`WatchEvent`.

        >>> async with ipam.follow_allocations("pods", resume_token=saved) as events:
        ...     async for event in events:
        ...         await handle(event)

        Not a coroutine (``await`` it to connect at once). Arguments and behaviour as
        :meth:`IpamClient.follow_allocations`.
        """
        if max_outage is not None and max_outage < 0:
            raise InvalidArgument(f"max_outage: {max_outage} is negative", metadata={"field": "max_outage"})
        return AsyncWatchStream(lambda stream: self._follow_body(pool, timeout, max_outage, stream),
                                resume_token=resume_token or "", bookmarks=bookmarks)

    # -- nodes and blocks -----------------------------------------------------------------------

    async def list_blocks(
        self, pool: str, *, node: str | None = None, page_size: int = 0, page_token: str = "",
        timeout: float | None = None,
    ) -> Page[Block]:
        """Returns one page of a pool's blocks (``page_size`` 0 means 100), or only ``node``'s.
        See :meth:`iter_blocks`."""
        request = pb.ListBlocksRequest(pool=pool, node=node or "", page_size=page_size, page_token=page_token)
        return c.blocks_page(await self._invoke(b.LIST_BLOCKS, request, timeout))

    async def iter_blocks(
        self, pool: str, *, node: str | None = None, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[Block]:
        """Yields every block of a pool (or of ``node``), one page at a time (``timeout`` applies
        to each page)."""
        token = ""
        while True:
            page = await self.list_blocks(pool, node=node, page_size=page_size, page_token=token, timeout=timeout)
            for item in page:
                yield item
            token = page.next_page_token
            if not token:
                return

    async def release_node(self, pool: str, node: str, *, timeout: float | None = None) -> ReleaseNodeResult:
        """Frees a node's empty blocks; blocks that still hold allocations stay the node's
        (``kept``). See :meth:`IpamClient.release_node`."""
        response = await self._invoke(b.RELEASE_NODE, pb.ReleaseNodeRequest(pool=pool, node=node), timeout)
        return c.release_node_result(response)


__all__ = ["AsyncIpamClient", "IpamError"]
