"""risk-engine: trust, risk and fraud control for online marketplaces."""

__version__ = "0.1.0"
