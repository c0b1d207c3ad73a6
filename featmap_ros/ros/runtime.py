"""What the node runs besides the processing path, in pure Python so it is tested off-ROS.

FrameWorker is the worker thread between the executor and the FrameProcessor, with the shutdown
order the node relies on; InputMonitor counts what arrives on each input before the time
synchroniser, which is silent when one input is; LogBridge routes the library's Python logging
(the estimator's CPU fallback, ...) into the node's logger and so to /rosout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from featmap_ros.ros.processor import FrameProcessor, LatestFrameBuffer, ProcessorOutput

__all__ = ["FrameWorker", "InputMonitor", "InputProblem", "LogBridge"]


class FrameWorker:
    """Take the newest frame from a LatestFrameBuffer, process it, publish it, on a thread of its own.

    The node's shutdown order: stop() first (it closes the buffer, waits for the frame in hand and
    makes sure no publish starts after it returns), then the node's timers and the node, then the
    rclpy context. A publish that fails once stopping has begun is shutdown, not an error: not logged.
    """

    def __init__(self, processor: FrameProcessor, publish: Callable[[ProcessorOutput], None],
                 now_ns: Callable[[], int] | None = None, buffer: LatestFrameBuffer | None = None) -> None:
        self.processor = processor
        self.publish = publish
        self.now_ns = now_ns  # the node's clock: end-to-end latency is image stamp -> publish on it
        self.buffer: LatestFrameBuffer = buffer if buffer is not None else LatestFrameBuffer()
        self.published = 0
        self._stopping = threading.Event()
        self._publishing = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def stopping(self) -> bool:
        """Whether stop() has begun."""
        return self._stopping.is_set()

    def put(self, frame: tuple[Any, Any, Any], stamp_ns: int) -> None:
        """Hand a synchronised (image, camera_info, detections) frame to the worker; ignored once stopping."""
        if not self._stopping.is_set():
            self.buffer.put(frame, stamp_ns)

    def start(self) -> None:
        """Start the thread (a daemon: a forward pass stuck past stop()'s timeout cannot hold the process)."""
        self._thread = threading.Thread(target=self._run, name="featmap-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            got = self.buffer.get_timed(timeout=0.5)
            if got is None:
                continue
            frame, wait_s = got
            out = self.processor.safe_process(*frame, newest_stamp_ns=self.buffer.newest_stamp_ns, wait_s=wait_s)
            if out is not None:
                self._publish(out)

    def _publish(self, out: ProcessorOutput) -> None:
        with self._publishing:
            if self._stopping.is_set():
                return
            try:
                self.publish(out)
            except Exception as err:  # noqa: BLE001 - the worker must outlive one failed publish
                if not self._stopping.is_set():
                    self.processor.log_once("publish", f"publishing failed: {err!r}")
                return
            self.published += 1
            if self.now_ns is not None:
                self.processor.record_published(out, self.now_ns())

    def stop(self, timeout_s: float = 3.0) -> bool:
        """Stop taking frames and wait for the thread; return whether it ended within timeout_s.

        After stop() returns no publish is in progress and none will start, even if a forward pass
        outlived the timeout: its result is dropped.
        """
        self._stopping.set()
        self.buffer.close()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._publishing.acquire(timeout=timeout_s):  # a publish in progress finishes first
            self._publishing.release()
        return self._thread is None or not self._thread.is_alive()


@dataclass(frozen=True)
class InputProblem:
    """An input that keeps frames from being processed: kind 'silent_<input>' or 'wrong_msgtype'."""

    kind: str
    message: str


class InputMonitor:
    """Count the messages of each input as they arrive, and the images that never found their partners.

    message_filters' ApproximateTimeSynchronizer never calls back while one input is silent, so the
    node cannot tell "no camera_info" from "no images" by the synchronised frames alone. The node
    calls arrived() from each subscriber and matched() from the synchroniser's callback; an image
    not matched within match_timeout_s is unmatched and counted against each partner input that had
    no message within slop_s of its stamp. An input with nothing for silent_after_s while images
    arrive is reported by name.
    """

    def __init__(self, topics: Mapping[str, str], slop_s: float, match_timeout_s: float = 1.0,
                 silent_after_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 max_pending: int = 1000) -> None:
        if "image" not in topics:
            raise ValueError(f"inputs {sorted(topics)} lack 'image'")
        self.topics = dict(topics)  # input -> resolved topic name
        self.slop_ns = int(slop_s * 1e9)
        self.match_timeout_s = match_timeout_s
        self.silent_after_s = silent_after_s
        self.clock = clock
        self.received: Counter[str] = Counter()
        self.unmatched: Counter[str] = Counter()  # partner input -> images without it
        self.unmatched_images = 0
        self.type_problems: list[str] = []
        self._last_arrival: dict[str, float] = {}
        self._stamps: dict[str, deque[int]] = {role: deque(maxlen=200) for role in self.topics}
        self._pending: deque[tuple[int, float]] = deque()  # (image stamp ns, arrival time)
        self._max_pending = max_pending
        self._matched: set[int] = set()
        self._started = clock()
        self._lock = threading.Lock()

    def arrived(self, role: str, stamp_ns: int) -> None:
        """Count one message of input `role` stamped stamp_ns."""
        with self._lock:
            now = self.clock()
            self.received[role] += 1
            self._last_arrival[role] = now
            self._stamps[role].append(int(stamp_ns))
            if role == "image":
                self._pending.append((int(stamp_ns), now))
                while len(self._pending) > self._max_pending:
                    self._expire(self._pending.popleft()[0])

    def matched(self, image_stamp_ns: int) -> None:
        """The synchroniser gave a frame with this image stamp."""
        with self._lock:
            self._matched.add(int(image_stamp_ns))

    def _expire(self, stamp_ns: int) -> None:
        """An image leaves the pending list: matched, or counted as unmatched against its missing partners."""
        if stamp_ns in self._matched:
            self._matched.discard(stamp_ns)
            return
        self.unmatched_images += 1
        for role, stamps in self._stamps.items():
            if role != "image" and not any(abs(s - stamp_ns) <= self.slop_ns for s in stamps):
                self.unmatched[role] += 1

    def update(self) -> None:
        """Settle the images older than match_timeout_s."""
        with self._lock:
            now = self.clock()
            while self._pending and now - self._pending[0][1] > self.match_timeout_s:
                self._expire(self._pending.popleft()[0])
            if len(self._matched) > 4 * self._max_pending:  # stamps matched after their image was settled
                self._matched.clear()

    def silent(self) -> list[str]:
        """Inputs with no message for silent_after_s (or ever) while images arrived within it."""
        with self._lock:
            now = self.clock()
            last_image = self._last_arrival.get("image")
            if last_image is None or now - last_image > self.silent_after_s:
                return []
            if now - self._started <= self.silent_after_s:
                return []  # too early to call anything silent
            return [role for role in self.topics if role != "image"
                    and now - self._last_arrival.get(role, self._started) > self.silent_after_s]

    def report(self) -> tuple[dict[str, str], InputProblem | None]:
        """Diagnostics key-values, and the problem that makes the node's level an error (or None)."""
        self.update()
        values = {f"received: {role} ({topic})": str(self.received[role]) for role, topic in self.topics.items()}
        values["unmatched images"] = str(self.unmatched_images)
        values.update({f"unmatched images: no {role}": str(self.unmatched[role])
                       for role in self.topics if role != "image"})
        if self.type_problems:
            return values, InputProblem("wrong_msgtype", "; ".join(self.type_problems))
        silent = self.silent()
        if silent:
            names = ", ".join(f"{role} topic {self.topics[role]}" for role in silent)
            message = (f"images arrive on {self.topics['image']} but nothing on {names} for "
                       f"{self.silent_after_s:g} s: no frame can be synchronised "
                       f"({self.unmatched_images} images unmatched)")
            return values, InputProblem("silent_" + "_".join(silent), message)
        return values, None


class LogBridge(logging.Handler):
    """A logging.Handler that forwards records to the node's logger: {'debug'|'info'|'warning'|'error': fn}."""

    def __init__(self, log: Mapping[str, Callable[[str], Any]]) -> None:
        super().__init__(level=logging.INFO)
        self.log = dict(log)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            level = "error"
        elif record.levelno >= logging.WARNING:
            level = "warning"
        else:
            level = "info" if record.levelno >= logging.INFO else "debug"
        try:
            self.log[level](f"[{record.name}] {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a log line must never take the node down
            self.handleError(record)

    @classmethod
    def install(cls, log: Mapping[str, Callable[[str], Any]], logger_name: str = "featmap_ros") -> LogBridge:
        """Attach a bridge to the package's logger (and stop it reaching Python's stderr fallback twice)."""
        bridge = cls(log)
        logger = logging.getLogger(logger_name)
        logger.addHandler(bridge)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        return bridge
