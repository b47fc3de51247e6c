"""Web framework integrations and observability (each imports its framework lazily).

- `aiovmc.integrations.asgi`: `CacheMiddleware` and `invalidate` for any ASGI app.
- `aiovmc.integrations.aiohttp`: `setup_cache` and `invalidate` for aiohttp.web.
- `aiovmc.integrations.litestar`: `AiovmcStore`, a litestar `Store`.
- `aiovmc.integrations.fastapi_cache`: `AiovmcBackend`, a fastapi-cache2 backend.
- `aiovmc.integrations.prometheus`: `CacheCollector` for prometheus_client.
"""
