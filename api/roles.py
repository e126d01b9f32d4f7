"""The roles a member (or an API key) holds in an organization, written once: the role
matrix (api/access.py) and every input that names a role use these."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

ROLES = ("owner", "admin", "operator", "viewer", "technician")

#: A role in a request body.
Role = Annotated[str, Meta(pattern=rf"^({'|'.join(ROLES)})$")]
