"""The root of the project's exceptions: every subsystem error derives from FeatmapError.

The CLI and the node catch FeatmapError at their edge (one line on stderr / one FATAL log), so a
new subsystem's error cannot slip past them. Each subsystem keeps its own small class (rosbags'
habit), deriving from FeatmapError and, where callers already rely on it, ValueError or
RuntimeError as well.
"""


class FeatmapError(Exception):
    """Any error the project raises on purpose: the message says what was expected and what came."""
