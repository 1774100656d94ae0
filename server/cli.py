"""`leanserve` command line (foundation stub: the model is prepared, the API answers 501)."""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from models.weights_source import resolve_model_dir


def build_app(model_dir: str) -> FastAPI:
    app = FastAPI(title="leanserve")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_dir}

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    def not_implemented(path: str) -> JSONResponse:
        error = {"message": "not implemented yet", "type": "not_implemented", "param": None, "code": None}
        return JSONResponse({"error": error}, status_code=501)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="leanserve")
    parser.add_argument("--model", default=None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    model_dir = resolve_model_dir(args.model)
    uvicorn.run(build_app(str(model_dir)), host=args.host, port=args.port)
