"""HTTP adapters: the V2 inference endpoints, the admin API and label feedback over aiohttp."""
