"""Training monitors: the online linear probe and the collapse monitors (``docs/monitoring.md``)."""
from contrast.monitors.collapse import collapse_scalars, collapse_warning
from contrast.monitors.hub import MonitorOptions, Monitors
from contrast.monitors.probe import OnlineProbe

__all__ = ["MonitorOptions", "Monitors", "OnlineProbe", "collapse_scalars", "collapse_warning"]
