"""Schema migrations for the chat backend and the `python -m db` tool."""
