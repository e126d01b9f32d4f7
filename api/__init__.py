"""The Litestar API (REST, auth, WebSocket relays). Built on the shared core in lms_core;
never imports the bridge."""
