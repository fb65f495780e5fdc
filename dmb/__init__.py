"""dmb: a Django Channels channel layer over POSIX shared memory.

    CHANNEL_LAYERS = {"default": {"BACKEND": "dmb.SharedMemoryChannelLayer"}}
"""

from .errors import (
    ConfigError,
    DmbError,
    ForeignChannel,
    InvalidMessage,
    MessageTooLarge,
    SegmentCorrupt,
    SegmentError,
    SegmentFull,
)
from .layer import SharedMemoryChannelLayer

__all__ = [
    "ConfigError",
    "DmbError",
    "ForeignChannel",
    "InvalidMessage",
    "MessageTooLarge",
    "SegmentCorrupt",
    "SegmentError",
    "SegmentFull",
    "SharedMemoryChannelLayer",
]
__version__ = "0.1.0"
