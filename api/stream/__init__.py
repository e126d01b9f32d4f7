"""The WebSocket relay of topic streams (issue 10)."""
