"""Optional time-series sink: one InfluxDB point per stored signal frame (off by default).

Uses influxdb-client's batching writer (its own background thread, batch size, flush
interval and exponential retries), so the ingest loop only enqueues points. The SQLite store
stays the system of record; the sink is for dashboards, and a failed write is logged and
counted, never allowed to stop ingest.
"""
from __future__ import annotations

import logging

import numpy as np
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import WriteOptions

from protocols.frames import decode_frame

from edge_server.ingest.settings import InfluxSettings
from edge_server.ingest.store import FrameRow

log = logging.getLogger(__name__)

MEASUREMENT = "iomt_frame"


def frame_point(row: FrameRow, hospital: str) -> Point:
    """The point of one frame: tags hospital/device/stream/patient, per-channel mean/min/max."""
    frame = decode_frame(row.payload)
    x = np.asarray(frame.samples, dtype=np.float64)
    point = (Point(MEASUREMENT).tag("hospital", hospital).tag("device", row.device_id).tag("stream", row.stream)
             .field("seq", row.seq).field("n_samples", row.n_samples).field("sample_rate", row.sample_rate)
             .time(int(row.start_ts * 1e9), WritePrecision.NS))
    if row.patient_id:
        point = point.tag("patient", row.patient_id)
    for c in range(x.shape[1]):
        point = point.field(f"mean_{c}", float(x[:, c].mean())).field(f"min_{c}", float(x[:, c].min())) \
            .field(f"max_{c}", float(x[:, c].max()))
    return point


class InfluxSink:
    """Batches frame points to an InfluxDB 2 ``/api/v2/write`` endpoint, retrying failures."""

    def __init__(self, settings: InfluxSettings, hospital: str) -> None:
        self.settings = settings
        self.hospital = hospital
        self.written = 0
        self.failed = 0
        self._client = InfluxDBClient(url=settings.url, token=settings.token, org=settings.org)
        options = WriteOptions(batch_size=settings.batch_size, flush_interval=settings.flush_interval_ms,
                               retry_interval=settings.retry_interval_ms, max_retries=settings.max_retries,
                               max_retry_delay=30_000, exponential_base=2)
        self._write = self._client.write_api(write_options=options, success_callback=self._ok,
                                             error_callback=self._error)

    def _ok(self, conf, data) -> None:
        self.written += data.count(b"\n") + 1 if isinstance(data, bytes) else 1

    def _error(self, conf, data, err) -> None:
        self.failed += data.count(b"\n") + 1 if isinstance(data, bytes) else 1
        log.warning("influx write of %d bytes failed after retries: %s", len(data), err)

    def write_frames(self, frames: list[FrameRow]) -> None:
        """Queue the frames' points (returns at once; the writer thread sends them)."""
        try:
            self._write.write(bucket=self.settings.bucket, org=self.settings.org,
                              record=[frame_point(f, self.hospital) for f in frames])
        except Exception as err:  # noqa: BLE001 - the sink must never stop ingest
            log.warning("influx sink dropped %d points: %s", len(frames), err)

    def close(self) -> None:
        """Flush what is queued and stop the writer."""
        self._write.close()
        self._client.close()
