"""The optimization passes, one per file; each is a pure function ``Graph -> Graph``."""
from .choose_strategy import choose_strategy
from .densify_zeros import densify_zeros
from .skip_dilation import skip_dilation
from .trim_padding import trim_padding

__all__ = ["trim_padding", "densify_zeros", "skip_dilation", "choose_strategy"]
