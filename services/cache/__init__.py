"""The shared cache: canonical KV block keys, the shared KV-block tier, KV events, the response cache."""
