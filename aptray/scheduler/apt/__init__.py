"""apt: Apt-Serve's SLO-aware scheduler on the hybrid cache. scheduler.py is the algorithm; features,
pricing and forecast what it reads; view the inputs of one iteration."""
from aptray.scheduler.apt.scheduler import AptScheduler

__all__ = ["AptScheduler"]
