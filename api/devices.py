"""/api/v1/orgs/{org}/devices: devices and their MQTT credentials."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.deps import AuditLog
from api.services.devices import (
    Device,
    DeviceCreate,
    DeviceCreated,
    DeviceService,
    DeviceUpdate,
    FirmwareConfig,
)
from lms_core.provisioning import DeviceCredentials

Devices = NamedDependency[DeviceService]


class DevicesController(Controller):
    path = "/devices"
    tags = ["devices"]

    @get("/", opt={"perm": "devices.read"})
    async def list_devices(
        self, access: Access, devices: Devices,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        after: Annotated[str | None, QueryParameter(description="continue after this slug", max_length=63)] = None,
        tag: Annotated[str | None, QueryParameter(max_length=64)] = None,
    ) -> list[Device]:
        """Devices of the organization, by slug; continue with ``after`` = the last slug."""
        return await devices.list_devices(access, limit=limit, after=after, tag=tag)

    @post("/", opt={"perm": "devices.write"}, status_code=HTTP_201_CREATED)
    async def create_device(self, access: Access, devices: Devices, audit: AuditLog,
                            data: JSONBody[DeviceCreate]) -> DeviceCreated:
        """Create a device; its MQTT credentials are in the answer, and only there."""
        return await devices.create(access, data, audit)

    @get("/{device:str}", opt={"perm": "devices.read"})
    async def get_device(self, access: Access, devices: Devices, device: FromPath[str]) -> Device:
        return await devices.get(access, device)

    @patch("/{device:str}", opt={"perm": "devices.write"})
    async def update_device(self, access: Access, devices: Devices, device: FromPath[str],
                            data: JSONBody[DeviceUpdate]) -> Device:
        """Change name, properties (replaced whole) or tags."""
        return await devices.update(access, device, data)

    @post("/{device:str}/disable", opt={"perm": "devices.write"}, status_code=200)
    async def disable(self, access: Access, devices: Devices, audit: AuditLog, device: FromPath[str]) -> Device:
        """Disable the device: the broker disconnects it and refuses it until enabled."""
        return await devices.set_enabled(access, device, False, audit)

    @post("/{device:str}/enable", opt={"perm": "devices.write"}, status_code=200)
    async def enable(self, access: Access, devices: Devices, audit: AuditLog, device: FromPath[str]) -> Device:
        return await devices.set_enabled(access, device, True, audit)

    @post("/{device:str}/credentials", opt={"perm": "devices.write"}, status_code=200)
    async def rotate(self, access: Access, devices: Devices, audit: AuditLog,
                     device: FromPath[str]) -> DeviceCredentials:
        """New MQTT password (shown only now); the old one stops working."""
        return await devices.rotate(access, device, audit)

    @post("/{device:str}/firmware-config", opt={"perm": "devices.write"}, status_code=200)
    async def firmware_config(self, access: Access, devices: Devices, audit: AuditLog,
                              device: FromPath[str]) -> FirmwareConfig:
        """The firmware's ``lms_config.json`` with **new** credentials (the old password stops
        working): the password is never stored, so the file cannot be produced without a
        rotation. A new device's file comes in its creation answer instead."""
        return await devices.rotate_for_firmware(access, device, audit)

    @delete("/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_device(self, access: Access, devices: Devices, audit: AuditLog, device: FromPath[str],
                            purge: FromQuery[bool] = False) -> None:
        """Delete the device and its broker credentials; ``purge=true`` deletes its data too."""
        await devices.delete(access, device, purge=purge, audit=audit)
