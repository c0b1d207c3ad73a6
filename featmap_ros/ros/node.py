"""The featmap ROS 2 node (Humble and Jazzy): synchronised camera frames in, poses, TF and markers out.

The only module that imports rclpy, tf2_ros, message_filters and diagnostic_updater. It stays thin:
parameters come from NodeConfig, and every frame goes through FrameProcessor.safe_process on a
FrameWorker thread, the same path bag replay takes. The executor callback only stores the newest
frame, so a slow network drops frames (counted) instead of blocking subscriptions, TF or diagnostics.

Shutdown runs in one order (rclpy's own SIGINT handler is off): a signal only sets an event; the
spin loop ends; the worker stops (no publish after that); the node, with its timers, is destroyed;
then the context goes. rclpy's handler would invalidate the context at once, under the feet of the
worker's publish and the diagnostics timer (the RCLErrors of a real Jazzy run).
"""

from __future__ import annotations

import array
import signal
import sys
import threading
from typing import Any

import message_filters
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_updater import DiagnosticStatusWrapper, Updater
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from tf2_ros import TransformBroadcaster
from vision_msgs.msg import Detection2DArray, Detection3DArray
from visualization_msgs.msg import MarkerArray

from featmap_ros.msg import HandJointsArray
from featmap_ros.ros.config import NodeConfig, ProcessorError, parameter_specs
from featmap_ros.ros.messages import MessageFactory, stamp_ns_of
from featmap_ros.ros.processor import (
    STARTUP_ERRORS,
    FrameProcessor,
    ProcessorOutput,
    input_type_problems,
    load_estimator_for,
)
from featmap_ros.ros.runtime import FrameWorker, InputMonitor, LogBridge

NODE_NAME = "featmap"
OUTPUT_DEPTH = 10  # reliable outputs: RViz and recorders subscribe reliable by default
LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR}


def _plain(value: Any) -> Any:
    """A parameter value with arrays (list, tuple, array.array) as lists, as NodeConfig expects."""
    return list(value) if isinstance(value, (list, tuple, array.array)) else value


class FeatmapNode(Node):
    """Subscribe to image + camera_info (+ detections), estimate on a worker thread, publish the results."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        log = self.get_logger()
        # The library logs through Python logging (the estimator's CPU fallback): send it to /rosout.
        self._log_bridge = LogBridge.install({"debug": log.debug, "info": log.info, "warning": log.warning,
                                              "error": log.error})
        self.config = self._declare_parameters()
        cfg = self.config
        log.info(f"loading the {cfg.task} model {cfg.model_path} on device {cfg.device}")
        estimator = load_estimator_for(cfg)
        self.processor = FrameProcessor(estimator, MessageFactory.for_rclpy(), cfg, log=log.warning)

        self.tf_broadcaster = TransformBroadcaster(self)
        self.pub_markers = self.create_publisher(MarkerArray, cfg.markers_topic, OUTPUT_DEPTH)
        poses_type = Detection3DArray if cfg.task == "objects" else HandJointsArray
        self.pub_poses = self.create_publisher(poses_type, cfg.poses_topic, OUTPUT_DEPTH)
        self.pub_overlay = self.create_publisher(Image, cfg.overlay_topic, OUTPUT_DEPTH)

        # Best effort subscriptions match both best-effort camera drivers and reliable publishers.
        inputs: dict[str, tuple[type, str]] = {
            "image": (CompressedImage if cfg.compressed else Image, cfg.image_topic),
            "camera_info": (CameraInfo, cfg.camera_info_topic),
        }
        if cfg.use_detections:
            inputs["detections"] = (Detection2DArray, cfg.detections_topic)
        self._subs = {role: message_filters.Subscriber(self, msg_type, topic, qos_profile=qos_profile_sensor_data)
                      for role, (msg_type, topic) in inputs.items()}
        # The topics as remapped, for the log and diagnostics (Subscriber.sub is the rclpy subscription).
        self.input_topics = {role: str(getattr(getattr(sub, "sub", None), "topic_name", inputs[role][1]))
                             for role, sub in self._subs.items()}
        self.inputs = InputMonitor(self.input_topics, slop_s=cfg.sync_slop_s)
        for role, sub in self._subs.items():
            sub.registerCallback(self._on_input, role)
        self.sync = message_filters.ApproximateTimeSynchronizer(list(self._subs.values()), cfg.queue_size,
                                                                cfg.sync_slop_s)
        self.sync.registerCallback(self._on_frame)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.worker = FrameWorker(self.processor, self._publish, now_ns=lambda: self.get_clock().now().nanoseconds)
        self.updater = Updater(self)
        self.updater.setHardwareID(f"featmap {estimator.device}")
        self.updater.add(f"featmap {cfg.task}", self._diagnose)
        self._timers = []
        if not hasattr(self.updater, "timer"):  # early ROS 2 ports of the Python updater had no timer of their own
            self._timers.append(self.create_timer(1.0, self.updater.update))
        self._check_input_types()
        self.worker.start()
        outputs = [cfg.markers_topic, cfg.poses_topic, cfg.overlay_topic]
        resolved = {role: topic for role, topic in self.input_topics.items()}
        log.info(f"{cfg.task} on {estimator.device}: listening to {resolved}, publishing {outputs} and TF")

    def _declare_parameters(self) -> NodeConfig:
        """Declare every NodeConfig field as a parameter and read them back through NodeConfig's checks."""
        # rclpy ignores parameters it is given but nobody declares: check them first so a typo fails here.
        # _parameter_overrides is rclpy's (Humble, Jazzy) only record of what the params file held.
        # Checking them with NodeConfig's rules also gives our message, not rclpy's, for a wrong type.
        overrides = getattr(self, "_parameter_overrides", {})
        given = {name: _plain(p.value) for name, p in overrides.items()}
        NodeConfig.from_params(given, source=f"parameters of node {self.get_fully_qualified_name()}")
        for spec in parameter_specs():
            descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only)
            if spec.ros_type == "string_array" and not spec.default:
                # rclpy types an empty list as BYTE_ARRAY and then refuses strings (ros2/rclpy#912);
                # NodeConfig checks the type instead.
                descriptor.dynamic_typing = True
            self.declare_parameter(spec.name, spec.default, descriptor)
        values = {}
        for spec in parameter_specs():
            value = self.get_parameter(spec.name).value
            values[spec.name] = _plain(value)
        return NodeConfig.from_params(values, source=f"node {self.get_fully_qualified_name()}")

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Apply live parameter changes (read-only ones rclpy refuses before this is called)."""
        ours = set(NodeConfig.__dataclass_fields__)
        changes = {p.name: p.value for p in params if p.name in ours}
        if changes:
            try:
                self.processor.update_config(**changes)
            except ProcessorError as err:
                return SetParametersResult(successful=False, reason=str(err))
        return SetParametersResult(successful=True)

    def _on_input(self, msg: Any, role: str) -> None:
        """Every message of every input, before the synchroniser: counted per input."""
        header = getattr(msg, "header", None)
        self.inputs.arrived(role, stamp_ns_of(header) if header is not None else 0)

    def _on_frame(self, image: Any, info: Any, detections: Any = None) -> None:
        """Synchroniser callback: store the frame for the worker and return at once."""
        stamp_ns = stamp_ns_of(image.header)
        self.inputs.matched(stamp_ns)
        self.worker.put((image, info, detections), stamp_ns)

    def _publish(self, out: ProcessorOutput) -> None:
        """Publish one frame's TF, markers, estimates and overlay (on the worker thread)."""
        if out.transforms:
            self.tf_broadcaster.sendTransform(out.transforms)
        self.pub_markers.publish(out.markers)
        self.pub_poses.publish(out.poses)
        if out.overlay is not None:
            self.pub_overlay.publish(out.overlay)

    def _check_input_types(self) -> None:
        """Compare the types published on our input topics with the configuration (at start, then per update)."""
        found = {name: list(types) for name, types in self.get_topic_names_and_types()}
        problems = input_type_problems(self.config, self.input_topics, found)
        if problems and not self.inputs.type_problems:
            self.get_logger().error("; ".join(problems))
        self.inputs.type_problems = problems

    def _diagnose(self, stat: DiagnosticStatusWrapper) -> DiagnosticStatusWrapper:
        """diagnostic_updater task: rate, latencies, skipped, dropped and unmatched frames, inputs, device."""
        self._check_input_types()
        level, message, values = self.processor.diagnostics(dropped=self.worker.buffer.dropped, inputs=self.inputs)
        stat.summary(LEVELS[level], message)
        for key, value in values.items():
            stat.add(key, value)
        return stat

    def close(self) -> None:
        """First step of shutdown: stop the worker (no publish after this), then the timers."""
        if not self.worker.stop(timeout_s=3.0):
            self.get_logger().warning("the worker did not stop within 3 s; its frame is dropped")
        for timer in [*self._timers, getattr(self.updater, "timer", None)]:
            if timer is not None:
                self.destroy_timer(timer)
        self._timers = []


def main(args: list[str] | None = None) -> None:
    """Run the node until SIGINT, SIGTERM or an external shutdown; exit 1 when it cannot start."""
    # Our own signal handling, so the context stays valid until the worker and timers have stopped.
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    node: FeatmapNode | None = None
    executor = SingleThreadedExecutor()
    code = 0
    try:
        try:
            node = FeatmapNode()
        except STARTUP_ERRORS as err:  # bad parameters, a missing or broken model: say why and stop
            get_logger(NODE_NAME).fatal(f"cannot start: {type(err).__name__}: {err}")
            code = 1
        if node is not None:
            executor.add_node(node)
        while node is not None and not stop.is_set() and rclpy.ok():
            try:
                executor.spin_once(timeout_sec=0.1)
            except ExternalShutdownException:
                break
            except Exception:
                if stop.is_set() or not rclpy.ok():
                    break  # an error once shutdown has begun is shutdown
                raise
    finally:
        if node is not None:
            node.close()
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
