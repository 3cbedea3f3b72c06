"""The README's example as a runnable app: `uvicorn recipes.fastapi_basic:app --port 8000`.

A FastAPI app behind the three foundation layers: every response carries an `X-Request-ID` and the API
security headers; bodies over 1 MiB, oversized headers and overlong URLs are refused with problem+json.
"""

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from nexus_middleware import BodySizeLimitMiddleware, RequestIDMiddleware, SecurityHeadersMiddleware
from nexus_middleware.context import current_request_id

app = FastAPI(title="nexus-middleware basic recipe")
app.add_middleware(BodySizeLimitMiddleware, max_body_size=1024 * 1024)
app.add_middleware(SecurityHeadersMiddleware, preset="api")
app.add_middleware(RequestIDMiddleware)  # added last = outermost: every response carries the id


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.get("/stream")
async def stream(count: int = 5) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        for index in range(min(count, 100)):
            yield f"line {index} of request {current_request_id()}\n"
            await asyncio.sleep(0)

    return StreamingResponse(lines(), media_type="text/plain")
