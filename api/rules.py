"""/api/v1/orgs/{org}/rules: alert rules (api/services/rules.py)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.deps import BIGINT_MAX, AuditLog, Id
from api.services.rules import Rule, RuleCreate, RuleService, RuleUpdate

Rules = NamedDependency[RuleService]


class RulesController(Controller):
    path = "/rules"
    tags = ["rules"]

    @get("/", opt={"perm": "devices.read"})
    async def list_rules(self, access: Access, rules: Rules,
                         limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
                         after: Annotated[int | None, QueryParameter(ge=1, le=BIGINT_MAX,
                                                                     description="continue after this id")] = None,
                         ) -> list[Rule]:
        """The organization's rules by id; continue with ``after`` = the last id."""
        return await rules.list_rules(access, limit=limit, after=after)

    @post("/", opt={"perm": "rules.manage"}, status_code=HTTP_201_CREATED)
    async def create(self, access: Access, rules: Rules, audit: AuditLog, data: JSONBody[RuleCreate]) -> Rule:
        """Create a rule; 422 says everything that is wrong with it."""
        return await rules.create(access, data, audit)

    @get("/{rule_id:int}", opt={"perm": "devices.read"})
    async def get_rule(self, access: Access, rules: Rules, rule_id: Id) -> Rule:
        return await rules.get(access, rule_id)

    @patch("/{rule_id:int}", opt={"perm": "rules.manage"})
    async def update(self, access: Access, rules: Rules, audit: AuditLog, rule_id: Id,
                     data: JSONBody[RuleUpdate]) -> Rule:
        """Change some fields; the result is checked whole. Disabling the rule, or changing what
        it watches, resolves its firing alerts and starts it afresh."""
        return await rules.update(access, rule_id, data, audit)

    @delete("/{rule_id:int}", opt={"perm": "rules.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_rule(self, access: Access, rules: Rules, audit: AuditLog, rule_id: Id) -> None:
        """Delete the rule: its firing alerts resolve (``rule deleted``), its alert history stays."""
        await rules.delete(access, rule_id, audit)
