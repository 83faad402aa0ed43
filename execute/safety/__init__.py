"""Never leave a fault behind: the journal, the watchdog, cleanup, and the runner's session."""

from depdrill.execute.safety.session import FaultSession

__all__ = ["FaultSession"]
