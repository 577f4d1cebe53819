"""The Model Context Protocol server of groundloop (``groundloop mcp``)."""
