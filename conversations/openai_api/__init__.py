"""OpenAI's API under /v1/, for the clients that speak it (the official SDKs, Open WebUI,
LibreChat, ...): OpenAI's shapes and errors, the product's keys, users and limits."""
