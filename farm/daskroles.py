"""Who may do what over Dask: certificate roles checked on every connection.

Dask's TLS proves that a peer holds a certificate of the cluster's CA, nothing more:
any member could open a ``Client`` and ``run`` code on every worker and on the
scheduler. A farm knows two kinds of certificates (issued by ``farm cluster init``):
``controller.NAME.farm`` and ``node.NAME.farm``. This module replaces Dask's ``tls://``
comm backend in farm processes with one that reads the peer's certificate right after
the TLS handshake, before a single Dask message is decoded, and

- lets the controller do anything (it is the only Dask client);
- lets a node send only what a worker or a nanny sends in a real run (register itself,
  heartbeats, task outcomes, events, fetching data from a peer), and refuses every
  other operation: ``register-client``, ``run``, ``run_function``, ``broadcast``,
  plugins, ``update-graph`` ... The connection is closed at the first refused one;
- never unpickles anything a node sends unasked: Dask unpickles a message's pickled
  parts while decoding it, before any handler sees it, so a message from a node is
  decoded without them (a pickled part closes the connection), and data it sends is
  kept serialized where the receiver only passes it on;
- keeps what a node tells the scheduler free of anything that Dask would unpickle
  further on, in the controller's client: a finished task's type and an erred task's
  exception (replaced by their text), events on topics other than the farm's own
  (Dask's clients unpickle ``warn`` events), serialized parts anywhere else, and the
  pickled sort key ``retire_workers`` accepts. A segment's outcome travels as a farm
  event (:mod:`farm.wire`), which the controller checks field by field;
- makes a node that dials its scheduler accept only the controller's certificate (or an
  outside scheduler's, ``scheduler.NAME.farm``, from ``farm cluster export-tls``), so a
  node's certificate cannot serve a fake controller to the other nodes.

Every farm process that speaks Dask imports this module (the controller, ``farm node``
and its worker through the ``farm.nodeservice`` preload); an outside scheduler needs
``--preload farm.daskroles`` (and its workers' nannies ``--preload-nanny farm.daskroles``).
"""

from __future__ import annotations

import logging
import struct
from ssl import SSLError
from typing import Any

import msgpack
from distributed.comm import registry
from distributed.comm.core import CommClosedError, FatalCommClosedError
from distributed.comm.tcp import (
    TLS,
    TLSBackend,
    TLSConnector,
    TLSListener,
    convert_stream_closed_error,
    read_bytes_rw,
)
from distributed.protocol.serialize import Serialized, msgpack_decode_default
from distributed.protocol.utils import msgpack_opts, unpack_frames
from tornado.iostream import StreamClosedError

from farm.wire import NODE_TOPICS, SENDER

log = logging.getLogger("farm.daskroles")

CONTROLLER, NODE, SCHEDULER = "controller", "node", "scheduler"
#: Roles trusted like the controller over Dask: the controller, and an outside Dask
#: scheduler's certificate (``farm cluster export-tls``), which hands out the
#: controller's tasks and must be dialled by nodes as their scheduler.
TRUSTED = frozenset({CONTROLLER, SCHEDULER})

#: What a node's worker and nanny send to the scheduler (requests and the worker's
#: batched stream), from Dask's worker and nanny, and seen in real runs. None of them
#: makes the scheduler run code. ("close" ends any connection politely.)
NODE_TO_SCHEDULER = frozenset({
    "close", "register-worker", "register_nanny", "unregister", "heartbeat_worker", "who_has", "log_event",
    "add_keys", "set_resources", "retire_workers",
    # the worker's stream
    "close-stream", "task-finished", "task-erred", "release-worker-data", "add-keys", "long-running",
    "reschedule", "keep-alive", "log-event", "worker-status-change", "request-refresh-who-has", "steal-response",
})
#: A worker asks a peer worker only for data (Dask's worker-to-worker transfer).
NODE_TO_WORKER = frozenset({"close", "get_data"})
#: A worker tells its own nanny that it is closing.
NODE_TO_NANNY = frozenset({"close", "close_gracefully"})


class RefusedPeer(CommClosedError):
    """A peer tried something its certificate does not allow; its connection is closed."""


def certificate_role(peercert: dict[str, Any] | None) -> str | None:
    """``controller``, ``scheduler`` or ``node`` from a verified peer certificate's common name."""
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value.endswith(".farm"):
                role = value.split(".", 1)[0]
                if role in (CONTROLLER, NODE, SCHEDULER):
                    return role
    return None


_controllers: set[str] = set()


def expect_controller(address: str) -> None:
    """This process dials the scheduler at ``address``: only the controller may answer there.
    Called by `farm node` for its nanny, by the worker's preload (before the worker
    registers) and by a controller using an outside scheduler."""
    _controllers.add(address.split("://", 1)[-1])


def _is_controller_address(loc: str) -> bool:
    return loc in _controllers


def _decode_without_pickle(frames: list, keep_serialized: bool, deserialize: bool) -> Any:
    """Dask's message decoding (distributed.protocol.core.loads) minus its pickles."""
    from distributed.protocol.compression import decompress
    from distributed.protocol.serialize import merge_and_deserialize

    def hook(obj: dict) -> Any:
        if obj.get("__Pickled__", 0):
            raise RefusedPeer("a node sent a pickled object")
        offset = obj.get("__Serialized__", 0)
        if isinstance(offset, int) and not isinstance(offset, bool) and offset > 0:
            sub_header = msgpack.loads(frames[offset], object_hook=msgpack_decode_default, use_list=False,
                                       **msgpack_opts)
            sub_frames = frames[offset + 1: offset + 1 + sub_header["num-sub-frames"]]
            if deserialize and not keep_serialized:
                if "compression" in sub_header:
                    sub_frames = decompress(sub_header, sub_frames)
                return merge_and_deserialize(sub_header, sub_frames)
            return Serialized(sub_header, sub_frames)
        return msgpack_decode_default(obj)

    return msgpack.loads(frames[0], object_hook=hook, use_list=False, **msgpack_opts)


class RoleTLS(TLS):
    """A TLS comm that knows its peer's role and reads a node's messages with care."""

    role: str | None = None
    allowed: frozenset[str] | None = None  # ops a node may send here (inbound comms only)
    inbound = False
    worker: str | None = None  # the address a node's worker registered on this connection

    def _read_extra(self) -> None:
        super()._read_extra()
        self.role = certificate_role(self._extra.get("peercert"))

    async def read(self, deserializers=None):
        if self.role in TRUSTED:
            return await super().read(deserializers)
        frames = await self._read_frames()
        try:
            msg = _decode_without_pickle(frames, keep_serialized=self.inbound, deserialize=self.deserialize)
        except RefusedPeer as exc:
            self._refuse(str(exc))
        except Exception as exc:  # not a Dask message: nothing to answer
            self._refuse(f"an undecodable message ({type(exc).__name__})")
        if self.inbound and self.allowed is not None:
            for op in _ops(msg):
                if op not in self.allowed:
                    self._refuse(f"a node may not send {op!r} here")
            if self.allowed is NODE_TO_SCHEDULER:
                try:
                    self.worker = _defuse(msg, self.worker)
                except RefusedPeer as exc:
                    self._refuse(str(exc))
        return msg

    def _refuse(self, why: str) -> None:
        log.warning("refused %s (certificate role %s): %s; connection closed", self.peer_address, self.role, why)
        self.abort()
        raise RefusedPeer(f"refused by the farm: {why}")

    async def _read_frames(self) -> list:
        # The frame reading of distributed.comm.tcp.TCP.read, without its decoding.
        stream = self.stream
        if stream is None:
            raise CommClosedError()
        try:
            size = struct.calcsize("Q")
            (nbytes,) = struct.unpack("Q", await stream.read_bytes(size))
            frames, buffers_nbytes = unpack_frames(await read_bytes_rw(stream, nbytes), partial=True)
            for buffer_nbytes in buffers_nbytes:
                frames.append(await read_bytes_rw(stream, buffer_nbytes))
        except (StreamClosedError, SSLError) as exc:
            self.stream = None
            self._closed = True
            convert_stream_closed_error(self, exc)
        except BaseException:
            self.abort()
            raise
        return frames


#: The arguments a worker gives ``retire_workers`` when it closes itself; Dask's others
#: include a sort key that the scheduler unpickles.
RETIRE_ARGUMENTS = frozenset({"op", "reply", "serializers", "workers", "close_workers", "remove", "stimulus_id"})
WITHHELD_TOPIC = "farm-withheld"


def _defuse(msg: Any, worker: str | None) -> str | None:
    """Make a node's message to the scheduler safe to pass on to the controller's client
    (in place): see the module's docstring. Raises :class:`RefusedPeer` for what no
    real node sends.

    ``worker`` is the address the node's worker registered on this connection (its
    batched stream follows the registration on the same connection); every farm event
    is stamped with it, so the controller knows which worker really sent an outcome.
    Returns the address, learnt from a ``register-worker``.
    """
    for item in msg if isinstance(msg, (list, tuple)) else [msg]:
        if not isinstance(item, dict):
            continue
        op = item.get("op")
        if op == "register-worker" and isinstance(item.get("address"), str):
            worker = item["address"]
        elif op == "task-finished":
            item["type"] = None  # the client would unpickle it; it has the typename
        elif op == "task-erred":
            item["exception"] = str(item.get("exception_text") or "the task failed on the node")
            item["traceback"] = None
        elif op in ("log-event", "log_event"):
            topics = item.get("topic")
            topics = list(topics) if isinstance(topics, (list, tuple)) else [topics]
            if not topics or not all(isinstance(topic, str) and topic in NODE_TOPICS for topic in topics):
                # Dask's own worker events (and a client's "warn", which it unpickles):
                # the controller wants none of them; they are kept aside, as text.
                item["topic"], item["msg"] = WITHHELD_TOPIC, repr(topics)[:200]
            elif isinstance(item.get("msg"), dict):
                item["msg"][SENDER] = worker
        elif op == "retire_workers":
            extra = set(item) - RETIRE_ARGUMENTS
            if extra or not isinstance(item.get("workers"), (list, tuple)):
                raise RefusedPeer(f"a node may retire only named workers, without {sorted(extra)}")
        if _holds_serialized(item):
            raise RefusedPeer(f"a node sent a serialized object in {op!r}")
    return worker


def _holds_serialized(value: Any) -> bool:
    if isinstance(value, Serialized):
        return True
    if isinstance(value, dict):
        return any(_holds_serialized(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_serialized(item) for item in value)
    return False


def _ops(msg: Any) -> list[Any]:
    if isinstance(msg, dict):
        return [msg["op"]] if "op" in msg else []
    if isinstance(msg, (list, tuple)):
        return [item.get("op") for item in msg if isinstance(item, dict) and "op" in item]
    return []


def _allowed_for(server: Any) -> frozenset[str]:
    from distributed import Nanny, Scheduler, Worker

    if isinstance(server, Scheduler):
        return NODE_TO_SCHEDULER
    if isinstance(server, Worker):
        return NODE_TO_WORKER
    if isinstance(server, Nanny):
        return NODE_TO_NANNY
    return frozenset()


class RoleTLSListener(TLSListener):
    comm_class = RoleTLS

    async def on_connection(self, comm: RoleTLS, handshake_overrides=None) -> None:
        if comm.role is None:
            log.warning("refused %s: its certificate is neither the controller's nor a node's", comm.peer_address)
            comm.abort()
            raise CommClosedError("not a farm certificate")
        comm.inbound = True
        if comm.role == NODE:
            comm.allowed = _allowed_for(getattr(self.comm_handler, "__self__", None))
        await super().on_connection(comm, handshake_overrides)


class RoleTLSConnector(TLSConnector):
    comm_class = RoleTLS

    async def connect(self, address, deserialize=True, **connection_args):
        comm = await super().connect(address, deserialize, **connection_args)
        if comm.role is None or (_is_controller_address(address) and comm.role not in TRUSTED):
            why = (f"tls://{address} presented {comm.role or 'an unknown'} certificate, not the controller's: "
                   "refusing to treat it as the scheduler")
            log.warning("%s", why)
            comm.abort()
            raise FatalCommClosedError(why)
        return comm


class RoleTLSBackend(TLSBackend):
    _connector_class = RoleTLSConnector
    _listener_class = RoleTLSListener


def install() -> None:
    """Make ``tls://`` in this process the role-checking backend (idempotent)."""
    if not isinstance(registry.backends.get("tls"), RoleTLSBackend):
        registry.backends["tls"] = RoleTLSBackend()


install()
