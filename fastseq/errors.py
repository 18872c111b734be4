"""Errors raised for bad arguments. Each is also a RuntimeError, the kind torch raises for the same mistakes, so
code written against torch.nn keeps catching them."""


class ShapeError(ValueError, RuntimeError):
    """A tensor argument has the wrong shape or size."""


class DTypeError(TypeError, RuntimeError):
    """A tensor argument has an unsupported or mismatched dtype."""


class DeviceError(ValueError, RuntimeError):
    """Tensor arguments are on different devices."""
