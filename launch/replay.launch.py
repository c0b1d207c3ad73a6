"""Replay a rosbag2 bag into the featmap node on simulated time, with RViz if asked.

    ros2 launch featmap_ros replay.launch.py bag:=/data/lmo_000002 task:=objects model_path:=/data/lmo.ckpt
    ros2 launch featmap_ros replay.launch.py bag:=/data/nyu_test task:=hands image_topic:=/camera/depth/image_raw

`ros2 bag play --clock` publishes /clock and the node runs with use_sim_time, so its outputs and
TF carry the bag's time. Playback starts after start_delay_s so the model is loaded first.
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction, TimerAction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "featmap_ros"
# task -> (params file in config/, image topic, camera_info topic, optical frame for RViz)
TASKS = {
    "objects": ("objects.yaml", "/camera/color/image_raw", "/camera/color/camera_info", "camera_color_optical_frame"),
    "hands": ("hands.yaml", "/camera/depth/image_raw", "/camera/depth/camera_info", "camera_depth_optical_frame"),
}


def launch_all(context: LaunchContext) -> list:
    """Bag player, featmap node (and RViz) with the arguments resolved."""
    arg = {name: LaunchConfiguration(name).perform(context) for name in (
        "bag", "task", "params_file", "model_path", "image_topic", "camera_info_topic", "detections_topic", "rate",
        "loop", "start_delay_s", "use_rviz", "fixed_frame",
    )}
    if arg["task"] not in TASKS:
        raise RuntimeError(f"task {arg['task']!r} is unknown; expected one of {sorted(TASKS)}")
    params_name, image, info, frame = TASKS[arg["task"]]
    share = FindPackageShare(PACKAGE).perform(context)
    params_file = arg["params_file"] or PathJoinSubstitution([share, "config", params_name]).perform(context)
    overrides: dict[str, object] = {"task": arg["task"], "use_sim_time": True}
    if arg["model_path"]:
        overrides["model_path"] = arg["model_path"]
    play = ["ros2", "bag", "play", arg["bag"], "--clock", "--rate", arg["rate"]]
    if arg["loop"].lower() in ("true", "1"):
        play.append("--loop")
    actions: list = [
        Node(
            package=PACKAGE, executable="featmap_node", name="featmap", output="screen",
            parameters=[params_file, overrides],
            remappings=[("image", arg["image_topic"] or image), ("camera_info", arg["camera_info_topic"] or info),
                        ("detections", arg["detections_topic"])],
        ),
        TimerAction(period=float(arg["start_delay_s"]), actions=[ExecuteProcess(cmd=play, output="screen")]),
    ]
    if arg["use_rviz"].lower() in ("true", "1"):
        rviz_config = PathJoinSubstitution([share, "config", "featmap.rviz"]).perform(context)
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="log",
                            arguments=["-d", rviz_config, "-f", arg["fixed_frame"] or frame],
                            parameters=[{"use_sim_time": True}]))
    return actions


def generate_launch_description() -> LaunchDescription:
    """Arguments, then the player and the nodes."""
    return LaunchDescription([
        DeclareLaunchArgument("bag", description="rosbag2 folder (or .mcap / .db3 file) to play"),
        DeclareLaunchArgument("task", default_value="objects", choices=sorted(TASKS), description="what to estimate"),
        DeclareLaunchArgument("params_file", default_value="", description="params file; empty: config/<task>.yaml"),
        DeclareLaunchArgument("model_path", default_value="", description="checkpoint; empty keeps the params file's"),
        DeclareLaunchArgument("image_topic", default_value="", description="image topic in the bag; empty: default"),
        DeclareLaunchArgument("camera_info_topic", default_value="", description="camera_info topic; empty: default"),
        DeclareLaunchArgument("detections_topic", default_value="/camera/color/detections",
                              description="2D detections topic (featmap bag make writes /camera/color/detections)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("loop", default_value="false", description="play the bag in a loop"),
        DeclareLaunchArgument("start_delay_s", default_value="5.0", description="wait for the model before playing"),
        DeclareLaunchArgument("use_rviz", default_value="false", description="start RViz with config/featmap.rviz"),
        DeclareLaunchArgument("fixed_frame", default_value="", description="RViz fixed frame; empty: task's camera"),
        OpaqueFunction(function=launch_all),
    ])
