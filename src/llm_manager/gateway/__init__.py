"""The forwarding hot path: OpenAI-style requests relayed to the model they name."""
