"""The OpenAI-compatible HTTP gateway: `meshserve openai-gateway` (docs/architecture.md)."""
