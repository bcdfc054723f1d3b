"""A plain paho subscriber that records everything a broker delivers (re-subscribing on reconnect)."""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols.messages import from_wire
from protocols.topics import Topic


class Collector:
    """``durable=True`` keeps a persistent session, so nothing is missed across a broker restart."""

    def __init__(self, port: int, pattern: str = "iomt/#", durable: bool = False, ca_file=None,
                 client_id: str | None = None, **auth) -> None:
        """``ca_file`` connects over TLS trusting that CA; ``username``/``password`` log in;
        reusing a durable collector's ``client_id`` takes over its session."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"collector-{port}-{id(self)}",
                                  clean_session=not durable)
        if auth:
            self.client.username_pw_set(auth["username"], auth["password"])
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(pattern, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("collector did not get its SUBACK")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, msg.retain))

    def decoded(self, stream: str | None = None):
        with self._lock:
            items = list(self.messages)
        out = []
        for topic, payload, _ in items:
            t = Topic.parse(topic)
            if stream is None or t.stream == stream:
                out.append((t, from_wire(t, payload)))
        return out

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.05)
        return predicate(self)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
