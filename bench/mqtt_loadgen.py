"""A bench-only MQTT load generator: QoS 1 signal frames over one raw socket per process.

This is a measuring tool, not the device agent (devices publish through ``device_agent``
with paho). It exists because paho publishers spend most of their CPU in paho itself and,
sharing a core with the broker, could not offer the 5,000 frames/s the ingest bench needs.

One process opens one MQTT 3.1.1 connection (stdlib ``socket``), sends CONNECT, then
PUBLISH packets (QoS 1) whose payloads are built by the project's frame encoder
(:func:`protocols.frames.pack_raw`, the same bytes ``encode_frame`` produces), pipelined
with a bounded window of unacknowledged packets; PUBACKs are read from the same socket.
With a ``rate`` it sends small bursts on a 2 ms tick so that the total sent follows
``rate * elapsed``; with ``rate=0`` it sends as fast as the window allows.

Latency stays honest: each burst's ``start_ts`` (what the edge's publish -> stored
latency is measured from) is the wall-clock time taken just before the burst is encoded
and written to the socket, so encoding and writing count against the consumer, never for it.
"""
from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator

from protocols.frames import DTYPES, pack_raw

#: Seconds between rate-paced bursts.
TICK_S = 0.002
#: Unacknowledged PUBLISH packets allowed on the connection.
WINDOW = 1000
CONNACK_TIMEOUT_S = 10.0
#: Give up when no PUBACK arrives for this long with packets outstanding.
ACK_TIMEOUT_S = 60.0

_FLOAT32 = DTYPES["float32"][0]


class LoadgenError(RuntimeError):
    """The broker refused or dropped the connection."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _utf8(client_id)
    return b"\x10" + _remaining_length(len(body)) + body


def publish_packet(topic: bytes, mid: int, payload: bytes) -> bytes:
    """MQTT 3.1.1 PUBLISH, QoS 1, not retained; ``topic`` already length-prefixed UTF-8."""
    n = len(topic) + 2 + len(payload)
    return b"\x32" + _remaining_length(n) + topic + mid.to_bytes(2, "big") + payload


class Publisher:
    """One MQTT connection that publishes pre-described frames and counts PUBACKs."""

    def __init__(self, port: int, client_id: str, host: str = "127.0.0.1", window: int = WINDOW) -> None:
        self.window = window
        self.sock = socket.create_connection((host, port), timeout=CONNACK_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(connect_packet(client_id))
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise LoadgenError(f"CONNACK {connack.hex()}")
        self.sock.setblocking(False)
        self._buf = bytearray()
        self._mid = 0
        self.sent = 0
        self.acked = 0

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise LoadgenError("broker closed the connection")
            data += chunk
        return data

    def _next_mid(self) -> int:
        self._mid = self._mid % 65535 + 1
        return self._mid

    def read_acks(self, wait: float = 0.0) -> None:
        """Consume whatever PUBACKs have arrived (waiting up to ``wait`` seconds for some)."""
        if wait > 0:
            select.select([self.sock], [], [], wait)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                raise LoadgenError("broker closed the connection")
            self._buf += chunk
        buf, pos, n = self._buf, 0, len(self._buf)
        while pos + 2 <= n:
            length = buf[pos + 1]  # PUBACKs are short: one length byte
            if pos + 2 + length > n:
                break
            if buf[pos] & 0xF0 != 0x40:
                raise LoadgenError(f"unexpected packet type {buf[pos]:#x}")
            self.acked += 1
            pos += 2 + length
        del buf[:pos]

    def send(self, items: list[tuple[bytes, str, str, int, float, int]], blocks: dict[str, bytes]) -> None:
        """Encode and write one burst; ``start_ts`` is taken now, before encoding and writing.

        ``items`` are ``(topic, device_id, stream, seq, sample_rate, channels)``.
        """
        now = time.time()
        out = []
        for topic, dev, stream, seq, hz, channels in items:
            payload = pack_raw(dev, stream, seq, now, hz, channels, _FLOAT32, int(hz), blocks[stream])
            out.append(publish_packet(topic, self._next_mid(), payload))
        self.send_packets(out)

    def send_packets(self, packets: list[bytes]) -> None:
        """Write whole PUBLISH packets, reading acknowledgements whenever the socket is full."""
        data = memoryview(b"".join(packets))
        while data:
            try:
                written = self.sock.send(data)
            except BlockingIOError:
                select.select([self.sock], [self.sock], [], 1.0)
                self.read_acks()
                continue
            data = data[written:]
        self.sent += len(packets)

    def drain(self) -> None:
        """Wait until every PUBLISH is acknowledged."""
        last, seen = time.monotonic(), self.acked
        while self.acked < self.sent:
            self.read_acks(wait=0.05)
            if self.acked != seen:
                last, seen = time.monotonic(), self.acked
            elif time.monotonic() - last > ACK_TIMEOUT_S:
                raise LoadgenError(f"{self.sent - self.acked} PUBLISH packets never acknowledged")

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()


def frame_plan(hospital: str, devices: list[str], seconds: int,
               streams: dict[str, tuple[int, float]]) -> Iterator[tuple[bytes, str, str, int, float, int]]:
    """Every frame in publish order: second by second, device by device, stream by stream."""
    topics = {(d, s): _utf8(f"iomt/{hospital}/wearable/{d}/{s}") for d in devices for s in streams}
    for second in range(seconds):
        for dev in devices:
            for stream, (channels, hz) in streams.items():
                yield topics[dev, stream], dev, stream, second, hz, channels


def publish(port: int, client_id: str, plan: Iterator, blocks: dict[str, bytes], rate: float,
            window: int = WINDOW, burst_max: int = 200) -> tuple[int, float]:
    """Publish ``plan`` at ``rate`` frames/s (0: as fast as the window allows).

    Returns ``(frames sent, seconds from the first write to the last PUBACK)``.
    """
    pub = Publisher(port, client_id, window=window)
    items = list(plan)
    total, pos = len(items), 0
    t0 = time.monotonic()
    try:
        while pos < total:
            room = window - (pub.sent - pub.acked)
            if rate > 0:
                due = int(rate * (time.monotonic() - t0)) + 1 - pos
                if due <= 0:
                    pub.read_acks()
                    time.sleep(TICK_S)
                    continue
                take = min(due, room, burst_max)
            else:
                take = min(room, burst_max)
            if take <= 0:
                pub.read_acks(wait=0.01)
                continue
            pub.send(items[pos:pos + take], blocks)
            pos += take
            pub.read_acks()
        pub.drain()
        return pub.sent, time.monotonic() - t0
    finally:
        pub.close()
