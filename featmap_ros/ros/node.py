"""The featmap ROS 2 node (Humble and Jazzy): synchronised camera frames in, poses, TF and markers out.

The only module that imports rclpy, tf2_ros, message_filters and diagnostic_updater. It stays thin:
parameters come from NodeConfig, and every frame goes through FrameProcessor.safe_process on a
worker thread, the same path bag replay takes. The executor callback only stores the newest frame,
so a slow network drops frames (counted) instead of blocking subscriptions, TF or diagnostics.
"""

from __future__ import annotations

import array
import sys
import threading
from typing import Any

import message_filters
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_updater import DiagnosticStatusWrapper, Updater
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException
from rclpy.logging import get_logger
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from tf2_ros import TransformBroadcaster
from vision_msgs.msg import Detection2DArray, Detection3DArray
from visualization_msgs.msg import MarkerArray

from featmap_ros.msg import HandJointsArray
from featmap_ros.ros.config import NodeConfig, ProcessorError, parameter_specs
from featmap_ros.ros.messages import MessageFactory, stamp_ns_of
from featmap_ros.ros.processor import FrameProcessor, LatestFrameBuffer, ProcessorOutput, load_estimator_for

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
        self.config = self._declare_parameters()
        cfg = self.config
        log = self.get_logger()
        log.info(f"loading the {cfg.task} model {cfg.model_path} on device {cfg.device}")
        estimator = load_estimator_for(cfg)
        self.processor = FrameProcessor(estimator, MessageFactory.for_rclpy(), cfg, log=log.warning)
        self.buffer: LatestFrameBuffer[tuple[Any, Any, Any]] = LatestFrameBuffer()

        self.tf_broadcaster = TransformBroadcaster(self)
        self.pub_markers = self.create_publisher(MarkerArray, cfg.markers_topic, OUTPUT_DEPTH)
        poses_type = Detection3DArray if cfg.task == "objects" else HandJointsArray
        self.pub_poses = self.create_publisher(poses_type, cfg.poses_topic, OUTPUT_DEPTH)
        self.pub_overlay = self.create_publisher(Image, cfg.overlay_topic, OUTPUT_DEPTH)

        # Best effort subscriptions match both best-effort camera drivers and reliable publishers.
        image_type = CompressedImage if cfg.compressed else Image
        self._subs = [
            message_filters.Subscriber(self, image_type, cfg.image_topic, qos_profile=qos_profile_sensor_data),
            message_filters.Subscriber(self, CameraInfo, cfg.camera_info_topic, qos_profile=qos_profile_sensor_data),
        ]
        if cfg.use_detections:
            self._subs.append(message_filters.Subscriber(
                self, Detection2DArray, cfg.detections_topic, qos_profile=qos_profile_sensor_data
            ))
        self.sync = message_filters.ApproximateTimeSynchronizer(self._subs, cfg.queue_size, cfg.sync_slop_s)
        self.sync.registerCallback(self._on_frame)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.updater = Updater(self)
        self.updater.setHardwareID(f"featmap {estimator.device}")
        self.updater.add(f"featmap {cfg.task}", self._diagnose)
        if not hasattr(self.updater, "timer"):  # early ROS 2 ports of the Python updater had no timer of their own
            self.create_timer(1.0, self.updater.update)

        self.worker = threading.Thread(target=self._work, name="featmap-worker", daemon=True)
        self.worker.start()
        inputs = [cfg.image_topic, cfg.camera_info_topic] + ([cfg.detections_topic] if cfg.use_detections else [])
        log.info(f"{cfg.task} on {estimator.device}: listening to {inputs}")

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

    def _on_frame(self, image: Any, info: Any, detections: Any = None) -> None:
        """Synchroniser callback: store the frame for the worker and return at once."""
        self.buffer.put((image, info, detections), stamp_ns_of(image.header))

    def _work(self) -> None:
        """Worker thread: process the newest frame, publish, repeat until the buffer closes."""
        while not self.buffer.closed:
            frame = self.buffer.get(timeout=0.5)
            if frame is None:
                continue
            out = self.processor.safe_process(*frame, newest_stamp_ns=self.buffer.newest_stamp_ns)
            if out is not None and self.context.ok():
                self._publish(out)

    def _publish(self, out: ProcessorOutput) -> None:
        """Publish one frame's TF, markers, estimates and overlay."""
        try:
            if out.transforms:
                self.tf_broadcaster.sendTransform(out.transforms)
            self.pub_markers.publish(out.markers)
            self.pub_poses.publish(out.poses)
            if out.overlay is not None:
                self.pub_overlay.publish(out.overlay)
        except Exception as err:  # noqa: BLE001 - shutdown can race a publish; the worker must not die
            if self.context.ok():
                self.processor.log_once("publish", f"publishing failed: {err!r}")

    def _diagnose(self, stat: DiagnosticStatusWrapper) -> DiagnosticStatusWrapper:
        """diagnostic_updater task: rate, latency, skipped and dropped frames, device."""
        level, message, values = self.processor.diagnostics(dropped=self.buffer.dropped)
        stat.summary(LEVELS[level], message)
        for key, value in values.items():
            stat.add(key, value)
        return stat

    def close(self) -> None:
        """Stop the worker thread (before destroy_node)."""
        self.buffer.close()
        self.worker.join(timeout=5.0)


def main(args: list[str] | None = None) -> None:
    """Run the node until Ctrl-C or an external shutdown; exit 1 when it cannot start."""
    rclpy.init(args=args)
    try:
        node = FeatmapNode()
    except (ValueError, OSError) as err:  # bad parameters or an unloadable model: say why and stop
        get_logger(NODE_NAME).fatal(f"cannot start: {err}")
        rclpy.try_shutdown()
        sys.exit(1)
    except KeyboardInterrupt:
        rclpy.try_shutdown()
        return
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
