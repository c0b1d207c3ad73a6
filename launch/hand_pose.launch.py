"""Run the featmap node for 3D hand joints on a depth camera, with RViz if asked.

    ros2 launch featmap_ros hand_pose.launch.py model_path:=/data/nyu.ckpt
    ros2 launch featmap_ros hand_pose.launch.py camera:=realsense use_rviz:=true

camera picks the default topics (Kinect-style /camera/depth/image_raw, RealSense-style
/camera/depth/image_rect_raw); image_topic / camera_info_topic override them. Detections are off in
config/hands.yaml (the nearest blob is the hand); use_detections:=true waits for them.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "featmap_ros"
# camera style -> (depth image topic, camera_info topic, optical frame for RViz)
CAMERAS = {
    "kinect": ("/camera/depth/image_raw", "/camera/depth/camera_info", "camera_depth_optical_frame"),
    "realsense": ("/camera/depth/image_rect_raw", "/camera/depth/camera_info", "camera_depth_optical_frame"),
}


def launch_nodes(context: LaunchContext) -> list[Node]:
    """The featmap node (and RViz) with the arguments resolved."""
    arg = {name: LaunchConfiguration(name).perform(context) for name in (
        "params_file", "model_path", "camera", "image_topic", "camera_info_topic", "detections_topic",
        "use_detections", "use_rviz", "fixed_frame",
    )}
    if arg["camera"] not in CAMERAS:
        raise RuntimeError(f"camera {arg['camera']!r} is unknown; expected one of {sorted(CAMERAS)}")
    image, info, frame = CAMERAS[arg["camera"]]
    overrides: dict[str, object] = {"task": "hands"}
    if arg["model_path"]:
        overrides["model_path"] = arg["model_path"]
    if arg["use_detections"]:
        overrides["use_detections"] = arg["use_detections"].lower() in ("true", "1")
    nodes = [Node(
        package=PACKAGE, executable="featmap_node", name="featmap", output="screen",
        parameters=[arg["params_file"], overrides],
        remappings=[("image", arg["image_topic"] or image), ("camera_info", arg["camera_info_topic"] or info),
                    ("detections", arg["detections_topic"])],
    )]
    if arg["use_rviz"].lower() in ("true", "1"):
        rviz_config = PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "featmap.rviz"]).perform(context)
        nodes.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="log",
                          arguments=["-d", rviz_config, "-f", arg["fixed_frame"] or frame]))
    return nodes


def generate_launch_description() -> LaunchDescription:
    """Arguments, then the nodes."""
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "hands.yaml"]),
                              description="ROS params file of the featmap node"),
        DeclareLaunchArgument("model_path", default_value="", description="checkpoint; empty keeps the params file's"),
        DeclareLaunchArgument("camera", default_value="kinect", choices=sorted(CAMERAS),
                              description="camera style picking the default topics"),
        DeclareLaunchArgument("image_topic", default_value="", description="depth image topic; empty: camera's"),
        DeclareLaunchArgument("camera_info_topic", default_value="", description="camera_info; empty: camera's"),
        DeclareLaunchArgument("detections_topic", default_value="/detections",
                              description="vision_msgs/Detection2DArray of hand boxes (with use_detections)"),
        DeclareLaunchArgument("use_detections", default_value="",
                              description="true/false; empty keeps the params file's"),
        DeclareLaunchArgument("use_rviz", default_value="false", description="start RViz with config/featmap.rviz"),
        DeclareLaunchArgument("fixed_frame", default_value="", description="RViz fixed frame; empty: camera's"),
        OpaqueFunction(function=launch_nodes),
    ])
