"""The node's runtime off-ROS (issue 16): latency accounting, unmatched images, shutdown order, logs to the node."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from test_processor import STAMP_NS, FakeEstimator, make_processor, object_frame

from featmap_ros.ros.messages import MessageFactory
from featmap_ros.ros.processor import LatestFrameBuffer, ProcessorStats
from featmap_ros.ros.runtime import FrameWorker, InputMonitor, LogBridge
from featmap_ros.ros.typestore import typestore


@pytest.fixture(scope="module")
def factory() -> MessageFactory:
    return MessageFactory.for_rosbags(typestore("humble"))


class Clock:
    """A settable clock (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------------------------
# Latency: end-to-end (stamp -> publish) and buffer wait beside the processing time


def test_end_to_end_and_buffer_wait_are_reported_beside_processing_time(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory)
    out = proc.safe_process(*object_frame(factory), wait_s=0.200)
    assert out is not None
    # Published 650 ms after the image stamp, on the node's clock.
    assert proc.record_published(out, STAMP_NS + 650_000_000) == pytest.approx(0.650)
    level, message, values = proc.diagnostics()
    assert level == "ok"
    assert values["end-to-end median (ms)"] == "650.0" and values["end-to-end p95 (ms)"] == "650.0"
    assert values["buffer wait median (ms)"] == "200.0" and values["published"] == "1"
    assert float(values["processing median (ms)"]) < 650.0
    assert message.startswith("0.0 Hz, 650 ms end-to-end median (")
    assert message.endswith("ms processing, 200 ms in the buffer)")
    assert "latency median (ms)" not in values  # the ambiguous key of the first version is gone


def test_without_publishing_only_processing_time_is_claimed(factory: MessageFactory) -> None:
    proc, _ = make_processor(factory)
    proc.safe_process(*object_frame(factory))
    _, message, values = proc.diagnostics()
    assert values["end-to-end median (ms)"] == "nan" and "processing median" in message and "end-to-end" not in message


def test_stats_keep_waits_and_end_to_end_percentiles() -> None:
    stats = ProcessorStats(window=100)
    for i in range(1, 101):
        stats.record(0.010, wait_s=i / 1000.0)
        stats.record_published(i / 100.0)
    s = stats.snapshot()
    assert s.wait_median_s == pytest.approx(0.0505) and s.wait_p95_s == pytest.approx(0.09505)
    assert s.end_to_end_median_s == pytest.approx(0.505) and s.end_to_end_p95_s == pytest.approx(0.9505)
    assert s.published == 100 and s.latency_median_s == pytest.approx(0.010)


def test_the_buffer_says_how_long_a_frame_waited() -> None:
    buf: LatestFrameBuffer[int] = LatestFrameBuffer()
    buf.put(7, stamp_ns=1)
    time.sleep(0.05)
    item, wait_s = buf.get_timed(timeout=0)
    assert item == 7 and 0.04 < wait_s < 1.0
    assert buf.get_timed(timeout=0.01) is None


# --------------------------------------------------------------------------------------------
# Images that found no partner: counted per missing input, the silent topic named


def monitor(clock: Clock, detections: bool = False) -> InputMonitor:
    topics = {"image": "/cam/image_raw", "camera_info": "/cam/camera_info"}
    if detections:
        topics["detections"] = "/yolo/detections"
    return InputMonitor(topics, slop_s=0.05, match_timeout_s=1.0, silent_after_s=5.0, clock=clock)


def test_images_without_camera_info_are_counted_and_the_silent_topic_named(factory: MessageFactory) -> None:
    clock = Clock()
    inputs = monitor(clock)
    for i in range(100):  # 10 Hz for 10 s, no camera_info at all
        clock.t += 0.1
        inputs.arrived("image", STAMP_NS + i * 100_000_000)
    clock.t += 1.5
    values, problem = inputs.report()
    assert values["received: image (/cam/image_raw)"] == "100"
    assert values["received: camera_info (/cam/camera_info)"] == "0"
    assert values["unmatched images"] == "100" and values["unmatched images: no camera_info"] == "100"
    assert problem is not None and problem.kind == "silent_camera_info"
    assert problem.message == ("images arrive on /cam/image_raw but nothing on camera_info topic /cam/camera_info "
                               "for 5 s: no frame can be synchronised (100 images unmatched)")
    proc, lines = make_processor(factory)
    level, message, diag = proc.diagnostics(inputs=inputs)
    assert level == "error" and message == problem.message and diag["unmatched images: no camera_info"] == "100"
    proc.diagnostics(inputs=inputs)
    assert len(lines) == 1 and "/cam/camera_info" in lines[0] and "[inputs_silent_camera_info: logged once" in lines[0]


def test_matched_images_are_not_counted_and_a_late_partner_is_named_per_input() -> None:
    clock = Clock()
    inputs = monitor(clock, detections=True)
    for i in range(20):
        clock.t += 0.1
        stamp = STAMP_NS + i * 100_000_000
        inputs.arrived("image", stamp)
        inputs.arrived("camera_info", stamp)
        if i % 2 == 0:  # the detector answers every second frame
            inputs.arrived("detections", stamp)
            inputs.matched(stamp)
    clock.t += 2.0
    values, problem = inputs.report()
    assert problem is None  # every input speaks
    assert values["unmatched images"] == "10"
    assert values["unmatched images: no detections"] == "10" and values["unmatched images: no camera_info"] == "0"


def test_nothing_is_called_silent_before_images_arrive_or_too_early() -> None:
    clock = Clock()
    inputs = monitor(clock)
    clock.t += 10.0
    assert inputs.report()[1] is None  # no images either: the processor's "no frames" says it
    inputs.arrived("image", STAMP_NS)
    clock.t += 1.0
    assert inputs.silent() == ["camera_info"]
    early = monitor(clock)
    early.arrived("image", STAMP_NS)
    assert early.silent() == []


def test_a_wrong_message_type_on_an_input_is_an_error_in_diagnostics(factory: MessageFactory) -> None:
    inputs = monitor(Clock())
    inputs.type_problems = ["image topic /cam/image_raw carries std_msgs/msg/String, but sensor_msgs/msg/Image is "
                            "expected"]
    proc, lines = make_processor(factory)
    level, message, _ = proc.diagnostics(inputs=inputs)
    assert level == "error" and message.startswith("image topic /cam/image_raw carries std_msgs/msg/String")
    assert "[inputs_wrong_msgtype: logged once" in lines[0]


def test_the_pending_images_stay_bounded() -> None:
    clock = Clock()
    inputs = InputMonitor({"image": "/i", "camera_info": "/c"}, slop_s=0.05, clock=clock, max_pending=50)
    for i in range(500):
        inputs.arrived("image", i * 10**9)
    assert len(inputs._pending) == 50 and inputs.unmatched_images == 450


# --------------------------------------------------------------------------------------------
# Shutdown order: stop the worker first, and no publish after it


class SlowEstimator(FakeEstimator):
    """Takes `delay_s` per frame, like a network on a loaded CPU."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("objects")
        self.delay_s = delay_s

    def estimate_objects(self, *args: Any) -> list:
        time.sleep(self.delay_s)
        return super().estimate_objects(*args)


def test_stop_under_load_waits_for_the_frame_in_hand_and_nothing_publishes_after(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, estimator=SlowEstimator(0.05), max_age_s=0.0)
    published: list[float] = []
    context_valid = threading.Event()
    context_valid.set()

    def publish(out: Any) -> None:
        if not context_valid.is_set():
            raise RuntimeError("Failed to publish: publisher's context is invalid")
        published.append(time.monotonic())

    worker = FrameWorker(proc, publish, now_ns=lambda: STAMP_NS + 10**8)
    worker.start()
    frame = object_frame(factory)
    end = time.monotonic() + 0.6
    while time.monotonic() < end:  # 30 Hz frames while stop comes
        worker.put(frame, STAMP_NS)
        time.sleep(1 / 30)
    assert worker.stop(timeout_s=2.0)
    stopped_at = time.monotonic()
    context_valid.clear()  # the node now destroys its timers and itself, then the context goes
    received = worker.buffer.received
    for _ in range(5):
        worker.put(frame, STAMP_NS)  # late synchroniser callbacks are ignored
    time.sleep(0.2)
    assert published and max(published) < stopped_at
    assert worker.published == len(published) and proc.stats.published == len(published)
    assert not any("publish" in line for line in lines)
    assert worker.buffer.received == received and worker.buffer.get(timeout=0) is None  # closed: frames dropped


def test_a_publish_failing_during_stop_is_shutdown_not_an_error(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, max_age_s=0.0)
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def publish(out: Any) -> None:
        calls.append(1)
        started.set()
        release.wait(2.0)
        raise RuntimeError("RCLError: failed to initialize wait set: the given context is not valid")

    worker = FrameWorker(proc, publish)
    worker.start()
    worker.put(object_frame(factory), STAMP_NS)
    assert started.wait(2.0)
    stopper = threading.Thread(target=worker.stop, kwargs={"timeout_s": 2.0})
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive()  # stop waits for the publish in progress
    release.set()
    stopper.join(3.0)
    assert not stopper.is_alive() and calls == [1] and lines == [] and worker.published == 0


def test_a_publish_failing_while_running_is_logged_once_and_the_worker_goes_on(factory: MessageFactory) -> None:
    proc, lines = make_processor(factory, max_age_s=0.0)
    calls: list[int] = []

    def publish(out: Any) -> None:
        calls.append(1)
        raise RuntimeError("a full queue")

    worker = FrameWorker(proc, publish)
    worker.start()
    for _ in range(3):
        worker.put(object_frame(factory), STAMP_NS)
        time.sleep(0.1)
    assert worker.stop()
    assert len(calls) == 3 and len(lines) == 1 and "[publish: logged once" in lines[0]


# --------------------------------------------------------------------------------------------
# Library warnings go to the node's logger (and /rosout), once each, at their level


def test_library_logging_is_routed_to_the_node_logger() -> None:
    got: list[tuple[str, str]] = []
    levels = ("debug", "info", "warning", "error")
    log = {level: (lambda msg, level=level: got.append((level, msg))) for level in levels}
    bridge = LogBridge.install(log, logger_name="featmap_ros.test_bridge")
    try:
        logging.getLogger("featmap_ros.test_bridge.estimator").warning("no CUDA device found: running on the CPU")
        logging.getLogger("featmap_ros.test_bridge").error("boom %d", 3)
    finally:
        logging.getLogger("featmap_ros.test_bridge").removeHandler(bridge)
    assert got == [("warning", "[featmap_ros.test_bridge.estimator] no CUDA device found: running on the CPU"),
                   ("error", "[featmap_ros.test_bridge] boom 3")]


def test_the_node_main_shuts_down_in_order_and_catches_the_startup_errors() -> None:
    """ros/node.py cannot run here: read its main() for the order issue 16 asks for."""
    import ast
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "featmap_ros" / "ros" / "node.py").read_text()
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    text = ast.get_source_segment(source, main)
    assert "signal_handler_options=SignalHandlerOptions.NO" in text  # rclpy's handler would kill the context
    assert "except STARTUP_ERRORS" in text and ".fatal(" in text
    order = [text.index(call) for call in ("node.close()", "node.destroy_node()", "rclpy.try_shutdown()")]
    assert order == sorted(order)
    close = ast.get_source_segment(source, next(
        n for c in ast.walk(ast.parse(source)) if isinstance(c, ast.ClassDef)
        for n in c.body if isinstance(n, ast.FunctionDef) and n.name == "close"))
    assert close.index("self.worker.stop(") < close.index("destroy_timer")
