"""sample_gateway: the reference gateway that composes nexus-middleware in front of a streaming reverse proxy."""

__all__: list[str] = []
