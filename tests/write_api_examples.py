"""Regenerate api/examples/ from a live run: python -m tests.write_api_examples (then review the diff)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tests.api_examples import EXAMPLES, REQUESTS, example_path, response_body, send
from tests.conftest import make_settings, open_api


def main() -> None:
    home = Path(tempfile.mkdtemp())
    client, api = open_api(make_settings(home / "var", f"sqlite:///{home / 'risk.db'}"))
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    try:
        state: dict[str, str] = {}
        for req in REQUESTS:
            headers = api.headers(req["role"]) if req["role"] else {}
            response = send(client, req, headers, state)
            shown_headers = {"Authorization": f"Bearer rk_<{req['role']} key>"} if req["role"] else {}
            example = {
                "request": {
                    "method": req["method"],
                    "path": req["path"],
                    "headers": shown_headers,
                    **({"body": req["body"]} if "body" in req else {}),
                },
                "response": {"status": response.status_code, "body": response_body(response)},
            }
            example_path(req["name"]).write_text(json.dumps(example, indent=2) + "\n")
    finally:
        client.__exit__(None, None, None)


if __name__ == "__main__":
    main()
