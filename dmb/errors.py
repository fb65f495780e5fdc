"""The exceptions dmb raises, and the one place C error codes become them."""

from channels.exceptions import ChannelFull, InvalidChannelLayerError


class DmbError(Exception):
    """Base class of every dmb-specific error."""


class ConfigError(DmbError, InvalidChannelLayerError):
    """A CONFIG option of the layer is wrong; the message names it."""


class SegmentError(DmbError, OSError):
    """The shared-memory segment cannot be created, opened or used."""


class SegmentCorrupt(SegmentError):
    """The segment is damaged: repair could not mend it, or an operation
    was cut short by the damage (the message says which)."""


class SegmentFull(DmbError, ChannelFull):
    """The segment has no room left (message store or one of its tables)."""


class MessageTooLarge(DmbError, ValueError):
    """A message is larger than the layer's max_message_size."""


class ForeignChannel(DmbError, ValueError, AssertionError):
    """receive() on a process-specific channel that another process owns.

    Also an AssertionError, which is what channels_redis raises here, so code
    written against either layer catches it.
    """


class InvalidMessage(DmbError, TypeError, AssertionError):
    """A message that is not a dict, or uses a key reserved by the layers.

    Also an AssertionError, which is what channels_redis and Channels'
    in-memory layer raise here.
    """
