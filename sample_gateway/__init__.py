"""sample_gateway: the reference gateway, nexus-middleware composed in front of a streaming reverse proxy."""

__all__: list[str] = []
