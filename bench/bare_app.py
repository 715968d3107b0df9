"""The baseline: a bare FastAPI endpoint that only validates the same payment model."""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI

from risk_engine.payments import PaymentIn

app = FastAPI()


@app.post("/v1/payments/score")
async def score(payment: PaymentIn) -> dict[str, object]:
    return {"payment_id": payment.payment_id, "decision": "allow", "score": 0}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
