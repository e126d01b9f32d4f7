"""/api/v1/orgs/{org}/devices/{device}/config: desired and reported configuration."""

from __future__ import annotations

from typing import Any

from litestar import Controller, delete, get, patch, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from api.access import Access
from api.deps import AuditLog
from api.services.config import ConfigService, DeviceConfig

Configs = NamedDependency[ConfigService]


class ConfigController(Controller):
    path = "/devices/{device:str}/config"
    tags = ["config"]

    @get("/", opt={"perm": "devices.read"})
    async def get_config(self, access: Access, configs: Configs, device: FromPath[str]) -> DeviceConfig:
        """Desired and reported configuration, their versions, and the keys that differ."""
        return await configs.get(access, device)

    @put("/", opt={"perm": "devices.write"})
    async def put_config(self, access: Access, configs: Configs, audit: AuditLog, device: FromPath[str],
                         data: JSONBody[dict[str, Any]]) -> DeviceConfig:
        """Replace the desired configuration: a new version, published retained to the device."""
        return await configs.put(access, device, data, audit)

    @patch("/", opt={"perm": "devices.write"})
    async def patch_config(self, access: Access, configs: Configs, audit: AuditLog, device: FromPath[str],
                           data: JSONBody[dict[str, Any]]) -> DeviceConfig:
        """Merge a JSON merge patch (RFC 7396; ``null`` removes a key) into a new version."""
        return await configs.patch(access, device, data, audit)

    @delete("/", opt={"perm": "devices.write"}, status_code=200)
    async def delete_config(self, access: Access, configs: Configs, audit: AuditLog,
                            device: FromPath[str]) -> DeviceConfig:
        """Drop the desired configuration and clear the device's retained config message."""
        return await configs.delete(access, device, audit)
