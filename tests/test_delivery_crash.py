"""Crashes and damage. The agent is killed with SIGKILL at random moments while it exports (to a
receiver that takes its time answering) a dozen times and restarted each time: every batch that
reached the queue arrives, duplicates are counted, and after each kill the queue directory reads
back cleanly. Flipped bytes and a truncated segment in the queue directory are skipped, counted
and logged; the rest is delivered. SIGTERM with an unreachable receiver keeps the data on disk for
the next start."""
import collections
import os
import random
import signal
import struct
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

from agent.export.wal import HEADER, parse_header, read_pending, segment_files
from tests.helpers import (agent_log, check_complete, check_exact, cpu_points, delivery_config, free_port,
                           self_metric, wait_until)
from tests.otlp_receiver import GrpcReceiver, attributes


def point_keys(bodies) -> set:
    """(metric, attributes, time) of every data point in these ExportMetricsServiceRequest bodies."""
    keys = set()
    for body in bodies:
        req = ExportMetricsServiceRequest.FromString(body)
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for p in getattr(m, m.WhichOneof("data")).data_points:
                        keys.add((m.name, tuple(sorted(attributes(p).items())), p.time_unix_nano))
    return keys


class SlowReceiver(GrpcReceiver):
    """The test receiver, answering after a random 0-250 ms so that kills land mid-request."""

    def __init__(self, port: int = 0):
        super().__init__(port)
        self.server.stop(None)
        rec = self

        def export(body, context):
            time.sleep(random.uniform(0, 0.25))
            rec._record(rec.metrics, ExportMetricsServiceRequest.FromString(body), {})
            return b""

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.metrics.v1.MetricsService",
            {"Export": grpc.unary_unary_rpc_method_handler(export, request_deserializer=None,
                                                           response_serializer=None)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.endpoint = f"http://127.0.0.1:{self.port}"


def received_keys(rec) -> collections.Counter:
    out = collections.Counter()
    with rec._cond:
        reqs = list(rec.metrics)
    for req in reqs:
        for key in point_keys([req.SerializeToString()]):
            out[key] += 1
    return out


def test_sigkill_at_random_moments_loses_no_queued_batch(tmp_path, start_agent):
    rng = random.Random()
    rec = SlowReceiver().start()
    cfg = delivery_config(tmp_path, rec.endpoint, collection_interval="500ms",
                          exporter={"otlp": {"connections": 2}}, shutdown_timeout="20s")
    queue_dir = str(tmp_path / "state" / "queue" / "otlp")
    must_arrive: set = set()
    lifetimes = []
    try:
        for i in range(12):
            started = time.time_ns()
            proc = start_agent(cfg)
            assert wait_until(lambda: " started " in agent_log(proc), 30, proc), agent_log(proc)
            time.sleep(rng.uniform(1.0, 3.0))
            assert proc.poll() is None, agent_log(proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            lifetimes.append((started, time.time_ns()))
            pending = read_pending(queue_dir)  # the directory reads back after every kill
            assert pending.corrupt_records <= 1, f"kill {i}: {pending.corrupt_records} damaged records"
            must_arrive |= point_keys(p.body for p in pending.payloads if p.signal == "metrics")
        # a last run delivers the rest and stops cleanly
        final_start = time.time_ns()
        proc = start_agent(cfg)
        assert wait_until(lambda: must_arrive <= set(received_keys(rec)), 60, proc), \
            f"{len(must_arrive - set(received_keys(rec)))} queued points never arrived\n{agent_log(proc)}"
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, agent_log(proc)
        got = received_keys(rec)
        assert must_arrive <= set(got)
        # within each killed run, every cpu point the agent had counted as of its last count that
        # arrived, exactly (what was still in the batcher at the kill, ~200 ms, had not reached
        # the queue: the last count before the kill may not have either)
        seen = cpu_points([rec])
        for run in lifetimes:
            check_exact(seen, [rec], run, whole=False)
        check_exact(seen, [rec], (final_start, time.time_ns()), whole=True)
        duplicates = sum(got.values()) - len(got)
        print(f"crash: 12 kills, {len(got)} distinct points, {duplicates} duplicates, "
              f"{len(must_arrive)} were in the queue at a kill")
        assert read_pending(queue_dir).payloads == []
    finally:
        rec.stop()


def frames(path) -> list:
    """(offset, length) of each whole frame of a segment file."""
    data = open(path, "rb").read()
    out, off = [], 0
    while off + HEADER.size <= len(data):
        h = parse_header(data[off:off + HEADER.size])
        if h is None:
            break
        out.append((off, HEADER.size + h.body_len))
        off += HEADER.size + h.body_len
    return out


def test_flipped_bytes_and_truncated_segment_are_skipped_counted_and_the_rest_delivered(tmp_path, start_agent):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cfg = delivery_config(tmp_path, endpoint, collection_interval="300ms", shutdown_timeout="1s",
                          exporter={"queue": {"segment_size": "64KiB"}})
    proc = start_agent(cfg)  # nobody listens: everything stays queued
    queue_dir = str(tmp_path / "state" / "queue" / "otlp")
    assert wait_until(lambda: os.path.isdir(queue_dir) and len(segment_files(queue_dir)) >= 4, 60, proc), \
        agent_log(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    assert "shutdown_queued" in agent_log(proc)
    before = read_pending(queue_dir)
    segs = [p for p in segment_files(queue_dir).values() if frames(p)]
    assert len(segs) >= 3 and all(len(frames(p)) >= 2 for p in segs[:2])
    damaged = []
    # a flipped byte in a body (its CRC fails), in a header (found again by the next magic) ...
    with open(segs[0], "r+b") as f:
        off, length = frames(segs[0])[1]
        f.seek(off + HEADER.size + length // 2)
        byte = f.read(1)
        f.seek(off + HEADER.size + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
        damaged.append((segs[0], off))
    with open(segs[1], "r+b") as f:
        off, _ = frames(segs[1])[0]
        f.seek(off + 12)  # the items field
        f.write(struct.pack("<I", 0xDEAD))
        damaged.append((segs[1], off))
    # ... and the newest segment cut in the middle of its last record
    last = segs[-1]
    off, length = frames(last)[-1]
    os.truncate(last, off + length // 2)
    after = read_pending(queue_dir)
    assert after.corrupt_records == 3
    survivors = point_keys(p.body for p in after.payloads if p.signal == "metrics")
    lost = point_keys(p.body for p in before.payloads if p.signal == "metrics") - survivors
    assert lost

    rec = GrpcReceiver(port).start()
    try:
        proc = start_agent(cfg)
        assert wait_until(lambda: survivors <= set(received_keys(rec)), 60, proc), agent_log(proc)
        time.sleep(1.5)  # a collection of the agent's own metrics after the replay
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, agent_log(proc)
        text = agent_log(proc)
        assert text.count("queue_corrupt_record") == 2, text
        assert "reason=crc" in text and "reason=frame" in text
        assert text.count("queue_truncated") == 1, text
        assert not lost & set(received_keys(rec))
        assert self_metric([rec], "hostagent.queue.corrupt_records", reason="crc") == 1
        assert self_metric([rec], "hostagent.queue.corrupt_records", reason="frame") == 1
        assert self_metric([rec], "hostagent.queue.corrupt_records", reason="torn_tail") == 1
        assert self_metric([rec], "hostagent.queue.dropped", reason="corrupt") > 0
    finally:
        rec.stop()


def test_sigterm_keeps_undelivered_data_on_disk_for_the_next_start(tmp_path, start_agent):
    port = free_port()
    cfg = delivery_config(tmp_path, f"http://127.0.0.1:{port}", shutdown_timeout="1s")
    first_start = time.time_ns()
    proc = start_agent(cfg)
    queue_dir = str(tmp_path / "state" / "queue" / "otlp")
    assert wait_until(lambda: os.path.isdir(queue_dir) and len(read_pending(queue_dir).payloads) >= 3, 30, proc), \
        agent_log(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, agent_log(proc)
    assert "shutdown_queued" in agent_log(proc) and "shutdown_dropped" not in agent_log(proc)
    kept = point_keys(p.body for p in read_pending(queue_dir).payloads if p.signal == "metrics")
    rec = GrpcReceiver(port).start()
    try:
        second_start = time.time_ns()
        proc = start_agent(cfg)
        assert wait_until(lambda: kept <= set(received_keys(rec)), 30, proc), agent_log(proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, agent_log(proc)
        # every collection of both runs, exactly: the first run's all came from the disk
        check_complete([rec], runs=[(first_start, second_start), (second_start, time.time_ns())])
    finally:
        rec.stop()
