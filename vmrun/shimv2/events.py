"""Task events for containerd (/tasks/create, /tasks/exit, ...), in the order they happen.

containerd 1.6 gives its shims TTRPC_ADDRESS: events go to its ttrpc Events service
(Forward, in an Envelope carrying namespace, topic and time). Without it, as older
containerds expect, each event is handed to the publish binary (`containerd publish`,
the Any on its stdin). A background thread sends them, so a slow containerd never holds
a task call; the queue is bounded (what a pod's tasks can produce between two sends).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from vmrun.errors import VmrunError
from vmrun.proc import run
from vmrun.shimv2.proto import events_ttrpc_pb2

log = logging.getLogger("vmrun.shimv2.events")

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
_QUEUE_LIMIT = 1024
_SEND_TRIES = 3


def to_any(message: Message) -> any_pb2.Any:
    """An Any as containerd's typeurl makes one: the message's full name, no prefix."""
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def timestamp(seconds: float | None = None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() if seconds is None else seconds) * 1e9))
    return stamp


@dataclass
class _Event:
    topic: str
    event: Message
    at: float


class EventPublisher:
    """publish(topic, event) queues; close() sends what is queued (bounded wait) and stops."""

    def __init__(self, namespace: str, ttrpc_address: str = "", containerd_address: str = "",
                 publish_binary: str = ""):
        self._namespace = namespace
        self._ttrpc_address = ttrpc_address.removeprefix("unix://")
        self._containerd_address = containerd_address
        self._publish_binary = publish_binary
        self._queue: queue.Queue[_Event | None] = queue.Queue(_QUEUE_LIMIT)
        self._client = None
        self._thread = threading.Thread(target=self._send_all, name="shim-events", daemon=True)
        self._thread.start()

    def publish(self, topic: str, event: Message) -> None:
        try:
            self._queue.put_nowait(_Event(topic, event, time.time()))
        except queue.Full:
            log.error("event queue full: %s dropped", topic)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if self._client is not None:
            self._client.close()

    def _send_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            for attempt in range(_SEND_TRIES):
                try:
                    self._send(item)
                    break
                except (VmrunError, OSError) as exc:
                    log.warning("publishing %s (try %d): %s", item.topic, attempt + 1, exc)
                    self._drop_client()
                    time.sleep(0.2 * (attempt + 1))

    def _send(self, item: _Event) -> None:
        if self._ttrpc_address:
            from vmrun.shimv2.ttrpc import TtrpcClient

            if self._client is None:
                self._client = TtrpcClient(self._ttrpc_address)
            envelope = events_ttrpc_pb2.Envelope(timestamp=timestamp(item.at), namespace=self._namespace,
                                                 topic=item.topic, event=to_any(item.event))
            request = events_ttrpc_pb2.ForwardRequest(envelope=envelope)
            self._client.call(EVENTS_SERVICE, "Forward", request.SerializeToString(), timeout=10.0)
        elif self._publish_binary:
            run([self._publish_binary, "--address", self._containerd_address, "publish", "--topic", item.topic,
                 "--namespace", self._namespace], input=to_any(item.event).SerializeToString(), timeout=10.0)
        else:
            log.debug("no way to publish %s: dropped", item.topic)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
