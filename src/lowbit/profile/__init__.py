"""``lowbit profile``: why isn't it faster? Per-layer time, GMAC/s, time in native kernels vs glue, the
kernel path dispatch chose, and each layer's roofline bound on this CPU (:func:`profile_file`,
:func:`profile_model`; the command is ``lowbit profile FILE``)."""

from .core import LayerProfile, ModelProfile, load_for_profile, profile_file, profile_model
from .output import format_profile, markdown_profile, plot_profile, write_profile_report
from .roofline import Ceilings, ceilings

__all__ = ["Ceilings", "LayerProfile", "ModelProfile", "ceilings", "format_profile", "load_for_profile",
           "markdown_profile", "plot_profile", "profile_file", "profile_model", "write_profile_report"]
