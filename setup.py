"""pip entry point for off-ROS use (training, evaluation, bag tools, tests).

On a ROS machine colcon builds this directory as the ament_cmake package of package.xml and
ignores this file. The network needs one of two alternative backends, neither a hard requirement:
- `.[torch]`: PyTorch, for training, export and the torch backend. An unpinned torch pulls a
  multi-GB CUDA build where none may be wanted: tools/setup.sh installs the right build instead.
- `.[onnx]`: ONNX Runtime, for the node and the bag replay on an exported model (`featmap
  export`), no torch needed; use onnxruntime-gpu instead on a GPU machine (CUDA, TensorRT).
`.[export]` adds what `featmap export` needs besides torch; `.[test]` includes onnx and export.
"""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="featmap_ros",
    version="0.1.0",
    description="Feature Mapping (CVPR 2018) for 3D object and hand pose, as a ROS 2 package",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["featmap_ros", "featmap_ros.*"]),
    # The message definitions travel with the package so off-ROS code can register them into
    # rosbags type stores (featmap_ros.ros.typestore looks here after the source tree).
    data_files=[
        ("share/featmap_ros/msg", sorted(glob("msg/*.msg"))),
        ("share/featmap_ros/config", sorted(glob("config/*"))),
        ("share/featmap_ros/launch", sorted(glob("launch/*.py"))),
    ],
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "opencv-python-headless>=4.8",
        "transforms3d>=0.4.1",
        "plyfile>=1.0",
        "pyyaml>=6.0",
        "pillow>=10.0",
        "rosbags>=0.11.9",
        "mcap>=1.1",
        "safetensors>=0.4",
        "tqdm>=4.66",  # reads TQDM_* environment variables (the main job's parallel bars)
        "matplotlib>=3.7",
    ],
    extras_require={
        "render": ["moderngl>=5.10"],
        "train": ["tensorboard>=2.14"],
        "torch": ["torch>=2.4"],
        "onnx": ["onnxruntime>=1.17"],
        "export": ["onnx>=1.16", "onnxscript>=0.1"],
        "test": ["pytest>=7", "mcap-ros2-support>=0.5", "ruff>=0.5", "onnxruntime>=1.17", "onnx>=1.16",
                 "onnxscript>=0.1"],
    },
    entry_points={"console_scripts": ["featmap = featmap_ros.cli:main"]},
)
