"""Sites and assets: devices grouped and listed by site."""

from __future__ import annotations

from tests.harness import ApiProcess
from tests.test_api_access import User


def test_devices_are_attached_to_sites_and_listed_by_site(api: ApiProcess, unique: str) -> None:
    o = User(api, f"{unique}@example.com")
    assert o.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    base = f"/api/v1/orgs/{unique}"
    for d in ("a", "b", "c"):
        assert o.call("POST", f"{base}/devices", {"slug": d}).status_code == 201
    assert o.call("POST", f"{base}/assets", {"slug": "north", "name": "North plant"}).status_code == 201
    assert o.call("POST", f"{base}/assets", {"slug": "north"}).status_code == 409
    assert o.call("POST", f"{base}/assets", {"slug": "South!"}).status_code == 422
    for d in ("a", "c", "c"):
        assert o.call("PUT", f"{base}/assets/north/devices/{d}").status_code == 204
    assert o.call("PUT", f"{base}/assets/north/devices/zzz").status_code == 404
    assert [d["slug"] for d in o.call("GET", f"{base}/assets/north/devices").json()] == ["a", "c"]
    assert o.call("GET", f"{base}/assets/north").json()["devices"] == 2
    assert o.call("DELETE", f"{base}/assets/north/devices/a").status_code == 204
    assert o.call("DELETE", f"{base}/assets/north/devices/a").status_code == 404
    assert [d["slug"] for d in o.call("GET", f"{base}/assets/north/devices").json()] == ["c"]
    assert o.call("DELETE", f"{base}/assets/north").status_code == 204
    assert o.call("GET", f"{base}/devices/c").status_code == 200  # devices outlive their site
    assert o.call("GET", f"{base}/assets").json() == []
    o.client.close()
