"""rosbag2 tools, one module per concern: io (the bag format: topics, writer, streamed reader, ground
truth out of messages), make (bags from datasets), replay (through the node's processing path) and
report (scoring a replay and writing its report)."""
