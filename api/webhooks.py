"""/api/v1/orgs/{org}/webhooks: signed alert notifications and their delivery log
(api/services/webhooks.py; sent by bridge/notify.py)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.deps import BIGINT_MAX, AuditLog, Id
from api.services.webhooks import (
    Attempt,
    Delivery,
    DeliveryState,
    Webhook,
    WebhookCreate,
    WebhookSecret,
    WebhookService,
    WebhookUpdate,
)

Webhooks = NamedDependency[WebhookService]
Limit = Annotated[int, QueryParameter(ge=1, le=1000)]
Cursor = Annotated[int | None, QueryParameter(ge=1, le=BIGINT_MAX, description="continue after this id")]
StateFilter = Annotated[DeliveryState | None, QueryParameter(name="state",
                                                             description="only deliveries in this state")]


class WebhooksController(Controller):
    path = "/webhooks"
    tags = ["webhooks"]

    @get("/", opt={"perm": "rules.manage"})
    async def list_webhooks(self, access: Access, webhooks: Webhooks) -> list[Webhook]:
        """The organization's webhooks, without their secrets."""
        return await webhooks.list_webhooks(access)

    @post("/", opt={"perm": "rules.manage"}, status_code=HTTP_201_CREATED)
    async def create(self, access: Access, webhooks: Webhooks, audit: AuditLog,
                     data: JSONBody[WebhookCreate]) -> WebhookSecret:
        """Create a webhook. Its secret is in this answer and nowhere else: receivers check
        ``X-LMS-Signature: sha256=<hex HMAC-SHA256 of the body, keyed by the secret>``."""
        return await webhooks.create(access, data, audit)

    @get("/{webhook_id:int}", opt={"perm": "rules.manage"})
    async def get_webhook(self, access: Access, webhooks: Webhooks, webhook_id: Id) -> Webhook:
        return await webhooks.get(access, webhook_id)

    @patch("/{webhook_id:int}", opt={"perm": "rules.manage"})
    async def update(self, access: Access, webhooks: Webhooks, audit: AuditLog, webhook_id: Id,
                     data: JSONBody[WebhookUpdate]) -> Webhook:
        """Change the URL, severities or enabled flag. Disabling gives up its queued deliveries."""
        return await webhooks.update(access, webhook_id, data, audit)

    @delete("/{webhook_id:int}", opt={"perm": "rules.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_webhook(self, access: Access, webhooks: Webhooks, audit: AuditLog, webhook_id: Id) -> None:
        await webhooks.delete(access, webhook_id, audit)

    @post("/{webhook_id:int}/rotate-secret", opt={"perm": "rules.manage"}, status_code=HTTP_200_OK)
    async def rotate_secret(self, access: Access, webhooks: Webhooks, audit: AuditLog,
                            webhook_id: Id) -> WebhookSecret:
        """A new secret, shown only now; it signs every attempt from now on."""
        return await webhooks.rotate_secret(access, webhook_id, audit)

    @get("/{webhook_id:int}/deliveries", opt={"perm": "rules.manage"})
    async def deliveries(self, access: Access, webhooks: Webhooks, webhook_id: Id, in_state: StateFilter = None,
                         limit: Limit = 100, before: Cursor = None) -> list[Delivery]:
        """The webhook's deliveries (one per alert change), newest first; continue with
        ``before`` = the last id."""
        return await webhooks.deliveries(access, webhook_id, state=in_state, limit=limit, before=before)

    @get("/{webhook_id:int}/deliveries/{delivery_id:int}/attempts", opt={"perm": "rules.manage"})
    async def attempts(self, access: Access, webhooks: Webhooks, webhook_id: Id, delivery_id: Id,
                       limit: Limit = 100, after: Cursor = None) -> list[Attempt]:
        """Every attempt of one delivery, oldest first; continue with ``after`` = the last id."""
        return await webhooks.attempts(access, webhook_id, delivery_id, limit=limit, after=after)
