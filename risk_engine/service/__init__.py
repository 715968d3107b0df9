"""The HTTP service: FastAPI app, one router per resource."""

from risk_engine.service.app import create_app

__all__ = ["create_app"]
