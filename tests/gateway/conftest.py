"""Fixtures of the gateway tests."""

from collections.abc import AsyncIterator

import pytest
from joserfc.jwk import ECKey

from sample_gateway.upstream_client import ClientKind, UpstreamClient, create_upstream_client


@pytest.fixture(params=["aiohttp", "httpx"])
async def upstream_client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamClient]:
    """Each test that takes it runs once per client kind: both must behave the same."""
    kind: ClientKind = request.param
    client = create_upstream_client(kind)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def signing_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
