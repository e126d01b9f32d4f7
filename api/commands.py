"""Commands to devices: /api/v1/orgs/{org}/devices/{device}/commands (one device) and
/api/v1/orgs/{org}/command-groups (a fleet: every device with a tag or of an asset)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED

from api.access import Access
from api.deps import AuditLog, Id
from api.services.commands import (
    MAX_WAIT_S,
    Command,
    CommandCreate,
    CommandGroup,
    CommandService,
    FleetCommandCreate,
    State,
)

Commands = NamedDependency[CommandService]
Limit = Annotated[int, QueryParameter(ge=1, le=1000)]
#: ``state`` is a name Litestar reserves for the app's state: the parameter is ``in_state``, the query key ``state``.
StateFilter = Annotated[State | None, QueryParameter(name="state", description="only commands in this state")]
Cursor = Annotated[int | None, QueryParameter(ge=1, le=2**63 - 1, description="continue after this id")]


class CommandsController(Controller):
    path = "/devices/{device:str}/commands"
    tags = ["commands"]

    @post("/", opt={"perm": "commands.send"}, status_code=HTTP_202_ACCEPTED)
    async def send(self, access: Access, commands: Commands, audit: AuditLog, device: FromPath[str],
                   data: JSONBody[CommandCreate],
                   wait: Annotated[int, QueryParameter(
                       ge=0, le=MAX_WAIT_S, description="wait up to this many seconds for the result")] = 0,
                   ) -> Response[Command]:
        """Send a command. 200 with the final state when it arrived within ``wait`` seconds,
        else 202 with the state now (``pending``/``delivered``); 503 if the broker did not
        take it (the command is then ``failed``)."""
        cmd, final = await commands.send(access, device, data, audit, wait=wait)
        return Response(cmd, status_code=HTTP_200_OK if final else HTTP_202_ACCEPTED,
                        headers={"Location": f"/api/v1/orgs/{access.slug}/devices/{device}/commands/{cmd.id}"})

    @get("/", opt={"perm": "devices.read"})
    async def list_commands(self, access: Access, commands: Commands, device: FromPath[str],
                            in_state: StateFilter = None, limit: Limit = 100,
                            before: Cursor = None) -> list[Command]:
        """The device's commands, newest first; continue with ``before`` = the last id."""
        return await commands.list_commands(access, device, state=in_state, limit=limit, before=before)

    @get("/{command_id:int}", opt={"perm": "devices.read"})
    async def get_command(self, access: Access, commands: Commands, device: FromPath[str],
                          command_id: Id) -> Command:
        return await commands.get(access, device, command_id)

    @post("/{command_id:int}/cancel", opt={"perm": "commands.send"}, status_code=HTTP_200_OK)
    async def cancel(self, access: Access, commands: Commands, audit: AuditLog, device: FromPath[str],
                     command_id: Id) -> Command:
        """Cancel a command that has no final result yet (409 otherwise)."""
        return await commands.cancel(access, device, command_id, audit)


class CommandGroupsController(Controller):
    path = "/command-groups"
    tags = ["commands"]

    @post("/", opt={"perm": "commands.send"}, status_code=HTTP_202_ACCEPTED)
    async def send(self, access: Access, commands: Commands, audit: AuditLog,
                   data: JSONBody[FleetCommandCreate]) -> CommandGroup:
        """The same command to every device with ``tag`` or of ``asset``: one command per
        device, summarised by state."""
        return await commands.send_group(access, data, audit)

    @get("/", opt={"perm": "devices.read"})
    async def list_groups(self, access: Access, commands: Commands, limit: Limit = 50,
                          before: Cursor = None) -> list[CommandGroup]:
        return await commands.list_groups(access, limit=min(limit, 200), before=before)

    @get("/{group_id:int}", opt={"perm": "devices.read"})
    async def get_group(self, access: Access, commands: Commands, group_id: Id) -> CommandGroup:
        return await commands.get_group(access, group_id)

    @get("/{group_id:int}/commands", opt={"perm": "devices.read"})
    async def group_commands(self, access: Access, commands: Commands, group_id: Id, in_state: StateFilter = None,
                             limit: Limit = 100, after: Cursor = None) -> list[Command]:
        return await commands.group_commands(access, group_id, state=in_state, limit=limit, after=after)

    @post("/{group_id:int}/cancel", opt={"perm": "commands.send"}, status_code=HTTP_200_OK)
    async def cancel(self, access: Access, commands: Commands, audit: AuditLog, group_id: Id) -> CommandGroup:
        return await commands.cancel_group(access, group_id, audit)
