"""The synchronous client."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
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
from ._stream import Stream, WatchStream
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


def _next_within(call: Any, wait: float | None, attempts: int) -> Any:
    """The call's next message, or None at its end; a wait longer than ``wait`` seconds cancels the
    call and raises :class:`DeadlineExceeded` (None: no limit)."""
    if wait is None:
        return next(call, None)
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        call.cancel()

    if wait <= 0:
        expire()
    timer = threading.Timer(max(wait, 0.0), expire)
    timer.daemon = True
    timer.start()
    try:
        message = next(call, None)
    except grpc.RpcError:
        if not fired.is_set():
            raise
        message = None
    finally:
        timer.cancel()
    if fired.is_set():
        raise DeadlineExceeded(f"no message within {wait:.3g}s (the call's deadline)", attempts=attempts)
    return message


class IpamClient:
    """A blocking client of ``dsipam.v1.IpamService``; one method per RPC.

    >>> with IpamClient("127.0.0.1:50051") as ipam:
    ...     ipam.allocate("pods", "c1/eth0", policy="require").allocation.ipv4

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
        interceptors: gRPC client interceptors, outermost first (they see every attempt).

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
            self._raw = grpc.secure_channel(self._conn.target, self._conn.tls.credentials(), options=self._conn.options)
        else:
            self._raw = grpc.insecure_channel(self._conn.target, options=self._conn.options)
        self._channel = grpc.intercept_channel(self._raw, *interceptors) if interceptors else self._raw
        self._stubs: dict[str, Any] = {}
        self._closed = False

    @classmethod
    def from_env(cls, **overrides: Any) -> IpamClient:
        """A client configured from ``DSIPAM_TARGET``, ``DSIPAM_CA_FILE``, ``DSIPAM_CERT_FILE``,
        ``DSIPAM_KEY_FILE``, ``DSIPAM_SERVER_NAME``, ``DSIPAM_TLS``, ``DSIPAM_TOKEN``,
        ``DSIPAM_TOKEN_FILE`` and ``DSIPAM_TIMEOUT``; keyword arguments win."""
        return cls(**{**b.env_settings(), **overrides})

    @property
    def target(self) -> str:
        """The gRPC target this client talks to."""
        return self._conn.target

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Closing twice is harmless."""
        if not self._closed:
            self._closed = True
            self._raw.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the call loop ------------------------------------------------------------------------

    def _invoke(self, method: b.Method[b.Req, b.Resp], request: b.Req, timeout: float | None) -> b.Resp:
        if self._closed:
            raise ValueError("IpamClient is closed")
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
                return cast(b.Resp, stub(request, timeout=left, metadata=self._conn.call_metadata()))
            except grpc.RpcError as exc:
                err = error_from_rpc(exc, attempts=attempt)
                if not policy.should_retry(err.code, attempt):
                    raise err from exc
                pause = deadline.pause(policy.backoff(attempt))
                if pause is None:
                    raise err from exc
            b.log.debug("%s failed with %s (attempt %d); retrying in %.2fs", method.name, err.code.name, attempt, pause)
            time.sleep(pause)

    # -- server streams -----------------------------------------------------------------------

    def _open(self, method: b.Method[b.Req, b.Resp], request: b.Req, wait: float | None, stream: Stream[Any],
              attempt: int) -> tuple[Any, b.Resp | None]:
        """One attempt: starts the call and waits up to ``wait`` seconds for its first message
        (None when the stream ended without one). Raises grpc.RpcError or DeadlineExceeded."""
        if self._closed:
            raise ValueError("IpamClient is closed")
        stub = self._stubs.get(method.name)
        if stub is None:
            stub = self._stubs[method.name] = self._channel.unary_stream(
                method.path, request_serializer=b.serialize, response_deserializer=method.deserialize
            )
        # No gRPC deadline: a stream may outlive its start; waits are bounded per message instead.
        call = stub(request, metadata=self._conn.call_metadata())
        stream._attach(call)
        return call, _next_within(call, wait, attempt)

    def _start(self, method: b.Method[b.Req, b.Resp], request: b.Req, timeout: float | None,
               stream: Stream[Any]) -> tuple[Any, b.Resp | None, int] | None:
        """Starts a stream with retries until its first message, within ``timeout`` (None: the
        client's); returns (call, first message, attempts), or None when the stream was cancelled."""
        deadline = Deadline(self._conn.timeout if timeout is None else timeout)
        policy = self._conn.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                call, first = self._open(method, request, deadline.remaining(), stream, attempt)
                return call, first, attempt
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
            if not stream._pause(pause):
                return None

    def _watch_body(self, request: pb.WatchAllocationsRequest, timeout: float | None,
                    stream: WatchStream) -> Generator[WatchEvent, None, None]:
        started = self._start(b.WATCH_ALLOCATIONS_STREAM, request, timeout, stream)
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
                message = next(call, None)
        except grpc.RpcError as exc:
            if stream.cancelled:
                return
            raise error_from_rpc(exc, attempts=attempts) from exc
        finally:
            call.cancel()

    def _follow_body(self, pool: str, timeout: float | None, max_outage: float | None,
                     stream: WatchStream) -> Generator[WatchEvent, None, None]:
        policy = self._conn.retry
        wait = self._conn.timeout if timeout is None else timeout
        failures = 0
        connected = False
        outage: Deadline | None = None
        while not stream.cancelled:
            request = pb.WatchAllocationsRequest(pool=pool, resume_token=stream.resume_token)
            call = None
            try:
                call, message = self._open(b.WATCH_ALLOCATIONS_STREAM, request, wait, stream, failures + 1)
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
                    message = next(call, None)
                err: IpamError | None = None  # the server ended the stream: watch again from the token
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
            if not stream._pause(pause or 0.0):
                return

    # -- pools --------------------------------------------------------------------------------

    def create_pool(
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
            return c.pool_from_pb(self._invoke(b.CREATE_POOL, request, timeout))
        except PoolAlreadyExists as exc:
            if exc.attempts <= 1:
                raise
            existing = self.get_pool(name, timeout=timeout)  # an earlier attempt may have created it
            if c.same_pool(existing, request, built):
                return existing
            raise

    def get_pool(self, name: str, *, timeout: float | None = None) -> Pool:
        """Returns a pool with its usage per family.

        Raises:
            PoolNotFound: no pool has that name.
        """
        return c.pool_from_pb(self._invoke(b.GET_POOL, pb.GetPoolRequest(name=name), timeout))

    def list_pools(self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None) -> Page[Pool]:
        """Returns one page of pools ordered by name (``page_size`` 0 means the server's 100).
        See :meth:`iter_pools` for all of them."""
        request = pb.ListPoolsRequest(page_size=page_size, page_token=page_token)
        return c.pools_page(self._invoke(b.LIST_POOLS, request, timeout))

    def iter_pools(self, *, page_size: int = 0, timeout: float | None = None) -> Iterator[Pool]:
        """Yields every pool, fetching one page at a time (``timeout`` applies to each page)."""
        token = ""
        while True:
            page = self.list_pools(page_size=page_size, page_token=token, timeout=timeout)
            yield from page
            token = page.next_page_token
            if not token:
                return

    def delete_pool(self, name: str, *, force: bool = False, timeout: float | None = None) -> None:
        """Deletes a pool. With ``force``, its allocations are released with it.

        Raises:
            PoolNotFound: no pool has that name (not raised when a retried call had deleted it).
            PoolHasAllocations: the pool holds allocations and ``force`` is False.
        """
        try:
            self._invoke(b.DELETE_POOL, pb.DeletePoolRequest(name=name, force=force), timeout)
        except PoolNotFound as exc:
            if exc.attempts <= 1:
                raise

    def update_pool(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        cooldown: float | dt.timedelta | None = None,
        node_affinity: NodeAffinity | str | None = None,
        timeout: float | None = None,
    ) -> Pool:
        """Changes the settings of a live pool and returns it; only the arguments given change.

        Args:
            name: the pool.
            labels: the new labels; they replace all the pool's labels (``{}`` removes them all).
            cooldown: the new cooldown in seconds or as a timedelta (0 disables it; at most 24 h).
                Addresses already in cooldown keep the time they were given.
            node_affinity: ``"borrow"`` or ``"strict"`` (see :meth:`create_pool`).

        Raises:
            InvalidArgument: nothing to change (before any call), or a bad label or cooldown.
            PoolNotFound: no pool has that name.
        """
        request = c.update_pool(name, labels, cooldown, node_affinity)
        return c.pool_from_pb(self._invoke(b.UPDATE_POOL, request, timeout))

    def reserve_addresses(
        self,
        pool: str,
        addresses: Iterable[AddressLike | NetworkLike] | AddressLike | NetworkLike,
        *,
        force: bool = False,
        timeout: float | None = None,
    ) -> Pool:
        """Reserves addresses or CIDRs of a live pool: they are never handed out. Returns the pool
        (see :attr:`Pool.reservations` and :attr:`FamilyUsage.reserved`). Reserving what is already
        reserved changes nothing, so a retried call is harmless.

        Args:
            pool: the pool.
            addresses: addresses or CIDRs inside the pool's ranges (strings or :mod:`ipaddress`
                objects), one or several.
            force: reserve even addresses that are allocated: their owners keep them, and they
                are not handed out again after their release.

        Raises:
            AddressAllocated: an address is allocated and ``force`` is False.
            InvalidArgument: an address or CIDR is malformed or outside the pool's ranges.
            PoolNotFound: no pool has that name.
        """
        request = pb.ReserveAddressesRequest(pool=pool, addresses=c.networks(addresses), force=force)
        return c.pool_from_pb(self._invoke(b.RESERVE_ADDRESSES, request, timeout))

    def unreserve_addresses(
        self,
        pool: str,
        addresses: Iterable[AddressLike | NetworkLike] | AddressLike | NetworkLike,
        *,
        timeout: float | None = None,
    ) -> Pool:
        """Removes reservations made by :meth:`reserve_addresses` (each exactly as it was reserved)
        and returns the pool.

        Raises:
            InvalidArgument: an address or CIDR is malformed or not reserved (not raised when a
                retried call finds that an earlier attempt removed them all).
            PoolNotFound: no pool has that name.
        """
        request = pb.UnreserveAddressesRequest(pool=pool, addresses=c.networks(addresses))
        try:
            return c.pool_from_pb(self._invoke(b.UNRESERVE_ADDRESSES, request, timeout))
        except InvalidArgument as exc:
            if exc.attempts <= 1:
                raise
            current = self.get_pool(pool, timeout=timeout)  # an earlier attempt may have removed them
            if c.holds_none_of(current, request.addresses):
                return current
            raise

    def add_pool_range(self, pool: str, range: Range | NetworkLike, *, timeout: float | None = None) -> Pool:
        """Adds a range to a live pool and returns the pool; an IPv6 range turns an IPv4-only pool
        dual-stack (see :meth:`migrate_pool` to give its owners IPv6 addresses).

        Args:
            pool: the pool.
            range: a :class:`Range` or a plain CIDR; it must not overlap the pool's ranges.

        Raises:
            InvalidArgument: a malformed range, or one that overlaps the pool's (not raised when a
                retried call finds the same range added by an earlier attempt).
            PoolNotFound: no pool has that name.
        """
        request = c.add_range(pool, range)
        try:
            return c.pool_from_pb(self._invoke(b.ADD_POOL_RANGE, request, timeout))
        except InvalidArgument as exc:
            if exc.attempts <= 1:
                raise
            current = self.get_pool(pool, timeout=timeout)  # an earlier attempt may have added it
            if c.has_range(current, request):
                return current
            raise

    def remove_pool_range(self, pool: str, cidr: NetworkLike, *, timeout: float | None = None) -> Pool:
        """Removes the range with this CIDR from a live pool and returns the pool. Addresses of the
        range in cooldown are forgotten with it.

        Raises:
            AddressAllocated: the range still holds allocations.
            FailedPrecondition: it is the pool's last range (delete the pool instead).
            RangeNotFound: the pool has no such range (not raised when a retried call finds that an
                earlier attempt removed it).
            PoolNotFound: no pool has that name.
        """
        net = parse_network(cidr, "cidr")
        request = pb.RemovePoolRangeRequest(pool=pool, cidr=str(net))
        try:
            return c.pool_from_pb(self._invoke(b.REMOVE_POOL_RANGE, request, timeout))
        except RangeNotFound as exc:
            if exc.attempts <= 1:
                raise
            current = self.get_pool(pool, timeout=timeout)  # an earlier attempt may have removed it
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
    ) -> Stream[MigrationProgress]:
        """Gives every owner of the pool the families ``policy`` asks for, in batches, keeping the
        addresses owners hold; returns an iterator of :class:`MigrationProgress`, one per batch,
        the last one being the total.

        >>> for progress in ipam.migrate_pool("pods", policy="prefer"):
        ...     print(progress.processed, "of", progress.total)

        The migration starts before this method returns (errors such as :class:`PoolNotFound`
        are raised here); iterate the stream to follow it, or ``cancel()`` it to stop between
        owners. Re-running a migration is safe: owners already dual-stack count as processed,
        not upgraded.

        Args:
            pool: the pool (add an IPv6 range first with :meth:`add_pool_range`).
            policy: ``"prefer"`` (the default: each owner gains what is free; one whose new family
                is full keeps what it has) or ``"require"`` (an owner that cannot hold both families
                counts as failed, and keeps what it has).
            batch_size: owners per batch, at most 1000; 0 means the server's 100.
            timeout: seconds to wait for each progress message (one batch), the first one with
                retries included; None: the client's timeout.

        Starting is retried like any call (UNAVAILABLE, ABORTED). Once progress has arrived, a
        failure (the server going away, say) ends the iteration with the error and is not
        retried: call ``migrate_pool`` again to finish the job.
        """
        request = c.migrate_request(pool, policy, batch_size)
        wait = self._conn.timeout if timeout is None else timeout

        def body(stream: Stream[MigrationProgress]) -> Generator[MigrationProgress, None, None]:
            started = self._start(b.MIGRATE_POOL_STREAM, request, timeout, stream)
            if started is None:
                return
            call, message, attempts = started
            try:
                while message is not None:
                    yield c.progress_from_pb(message)
                    message = _next_within(call, wait, attempts)
            except grpc.RpcError as exc:
                if stream.cancelled:
                    return
                raise error_from_rpc(exc, attempts=attempts) from exc
            finally:
                call.cancel()

        return Stream(body)._prime()

    # -- allocations --------------------------------------------------------------------------

    def allocate(
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
        return c.allocate_result(self._invoke(b.ALLOCATE, request, timeout))

    def release(
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
        return tuple(c.address_from_pb(a) for a in self._invoke(b.RELEASE, request, timeout).released)

    def get_allocation(self, pool: str, owner: str, *, timeout: float | None = None) -> Allocation:
        """Returns what ``owner`` holds in ``pool``.

        Raises:
            AllocationNotFound: the owner holds nothing there.
            PoolNotFound: the pool does not exist.
        """
        request = pb.GetAllocationRequest(pool=pool, owner=owner)
        return c.allocation_from_pb(self._invoke(b.GET_ALLOCATION, request, timeout))

    def list_allocations(
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
        return c.allocations_page(self._invoke(b.LIST_ALLOCATIONS, request, timeout))

    def iter_allocations(
        self,
        pool: str,
        *,
        selector: Mapping[str, str] | None = None,
        family: Family | str | int | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[Allocation]:
        """Yields every allocation of a pool (those matching ``selector`` and ``family``, as
        :meth:`list_allocations`), one page at a time (``timeout`` applies to each page)."""
        token = ""
        while True:
            page = self.list_allocations(pool, selector=selector, family=family, page_size=page_size,
                                         page_token=token, timeout=timeout)
            yield from page
            token = page.next_page_token
            if not token:
                return

    def garbage_collect(
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
        return tuple(c.allocation_from_pb(a) for a in self._invoke(b.GARBAGE_COLLECT, request, timeout).released)

    # -- watching -------------------------------------------------------------------------------

    def watch_allocations(
        self, pool: str, resume_token: str | None = None, *, timeout: float | None = None
    ) -> WatchStream:
        """Streams the pool's allocate and release events; returns an iterator of
        :class:`WatchEvent` (a :class:`WatchStream`).

        >>> with ipam.watch_allocations("pods") as events:
        ...     for event in events:
        ...         print(event.type, event.owner, event.addresses)

        The first message is always a bookmark carrying the current resume token, and an idle
        watch gets a fresh bookmark every 30 s. Events of one owner arrive in the order they
        happened. The stream never ends by itself: leave the ``with`` block, ``break`` and
        ``close()``, or ``cancel()`` it from another thread.

        Args:
            pool: the pool.
            resume_token: the ``resume_token`` of the last message seen, to continue right after
                it (nothing missed, nothing twice); None: from now (the first message is a
                bookmark of that position; older events are not replayed).
            timeout: seconds to start the watch (until its first message, retries included);
                None: the client's timeout. The stream itself has no deadline.

        Raises (here, or while iterating):
            PoolNotFound: no pool has that name.
            InvalidArgument: a token that is not this pool's.
            ResumeTokenExpired: the token is older than the events the server keeps (an hour):
                list the allocations and watch again without a token.

        Starting is retried (UNAVAILABLE, ABORTED) within ``timeout``. A failure after that ends
        the iteration with the error, :class:`ServiceUnavailable` when the server went away; the
        stream's :attr:`~WatchStream.resume_token` says where to continue.
        :meth:`follow_allocations` does that by itself.
        """
        request = pb.WatchAllocationsRequest(pool=pool, resume_token=resume_token or "")
        return WatchStream(lambda stream: self._watch_body(request, timeout, stream),
                           resume_token=request.resume_token)._prime()

    def follow_allocations(
        self,
        pool: str,
        resume_token: str | None = None,
        *,
        bookmarks: bool = False,
        max_outage: float | None = None,
        timeout: float | None = None,
    ) -> WatchStream:
        """A watch that resumes by itself: :meth:`watch_allocations` plus reconnection, for a
        controller's watch loop.

        >>> with ipam.follow_allocations("pods", resume_token=saved) as events:
        ...     for event in events:
        ...         handle(event)
        ...         saved = events.resume_token

        When the stream breaks with a code the client's :class:`RetryPolicy` retries (UNAVAILABLE:
        the server restarted or the connection dropped; ABORTED), or the server ends it, it is
        started again from the resume token of the last message seen, after the policy's backoff,
        so the events in between arrive once, in order, none missed. Reconnection goes on until
        it succeeds, or until ``max_outage`` seconds have passed since the stream broke.
        :attr:`~WatchStream.resumes` counts the reconnections.

        Args:
            pool: the pool.
            resume_token: where to start (see :meth:`watch_allocations`).
            bookmarks: also yield bookmarks (they carry no change; their tokens are tracked anyway).
            max_outage: seconds to keep reconnecting before raising the last error; None: for ever.
                The first connection counts as well.
            timeout: seconds each (re)connection may take to deliver its first message.

        Raises (while iterating): errors that are not retried, such as :class:`PoolNotFound` (the
        pool was deleted) or :class:`ResumeTokenExpired` (the outage outlasted the server's event
        retention: list the allocations again and follow without a token).
        """
        if max_outage is not None and max_outage < 0:
            raise InvalidArgument(f"max_outage: {max_outage} is negative", metadata={"field": "max_outage"})
        return WatchStream(lambda stream: self._follow_body(pool, timeout, max_outage, stream),
                           resume_token=resume_token or "", bookmarks=bookmarks)._prime()

    # -- nodes and blocks -----------------------------------------------------------------------

    def list_blocks(
        self, pool: str, *, node: str | None = None, page_size: int = 0, page_token: str = "",
        timeout: float | None = None,
    ) -> Page[Block]:
        """Returns one page of a pool's blocks (``page_size`` 0 means 100), or only ``node``'s:
        what a routing controller needs to program one route per block. See :meth:`iter_blocks`."""
        request = pb.ListBlocksRequest(pool=pool, node=node or "", page_size=page_size, page_token=page_token)
        return c.blocks_page(self._invoke(b.LIST_BLOCKS, request, timeout))

    def iter_blocks(
        self, pool: str, *, node: str | None = None, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[Block]:
        """Yields every block of a pool (or of ``node``), one page at a time (``timeout`` applies
        to each page)."""
        token = ""
        while True:
            page = self.list_blocks(pool, node=node, page_size=page_size, page_token=token, timeout=timeout)
            yield from page
            token = page.next_page_token
            if not token:
                return

    def release_node(self, pool: str, node: str, *, timeout: float | None = None) -> ReleaseNodeResult:
        """Frees a node's empty blocks (for a node that left): they become free for any node.
        Blocks that still hold allocations stay the node's and are reported as ``kept``.
        Idempotent: a retried call finds nothing more to release.

        Raises:
            InvalidArgument: an empty or malformed node name.
            PoolNotFound: no pool has that name.
        """
        response = self._invoke(b.RELEASE_NODE, pb.ReleaseNodeRequest(pool=pool, node=node), timeout)
        return c.release_node_result(response)


__all__ = ["IpamClient", "IpamError"]
