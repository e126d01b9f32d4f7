// The signed-in user: change password (which ends every session), sign out, create an organization.
import * as api from "../api.js";
import { field, fill, h, notice } from "../dom.js";

export function renderAccount({ me, signOut, orgsChanged }) {
  const current = h("input", { type: "password", autocomplete: "current-password", required: true });
  const fresh = h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 8 });
  const again = h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 8 });
  const pwMessage = h("div");
  const pwForm = h("form", { class: "card", "aria-labelledby": "pw-title" },
    h("h2", { id: "pw-title" }, "Change password"),
    field("Current password", current),
    field("New password", fresh),
    field("New password again", again),
    pwMessage,
    h("button", { type: "submit", class: "primary" }, "Change password"));
  pwForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (fresh.value !== again.value) {
      fill(pwMessage, notice("error", "The two new passwords differ."));
      return;
    }
    try {
      await api.post("/auth/password", { current_password: current.value, new_password: fresh.value });
      // Every token of the user is revoked, this one too: sign in again.
      fill(pwMessage, notice("ok", "Password changed. Every session has ended; sign in with the new password."));
      setTimeout(signOut, 1500);
    } catch (exc) {
      fill(pwMessage, notice("error", exc.message));
    }
  });

  const slug = h("input", { type: "text", required: true, pattern: "[a-z0-9][a-z0-9_-]{0,62}", autocomplete: "off" });
  const name = h("input", { type: "text", autocomplete: "off" });
  const orgMessage = h("div");
  const orgForm = h("form", { class: "card", "aria-labelledby": "org-title" },
    h("h2", { id: "org-title" }, "New organization"),
    field("Slug", slug, "lower case letters, digits, - and _; used in topics"),
    field("Name", name),
    orgMessage,
    h("button", { type: "submit" }, "Create organization"));
  orgForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const org = await api.post("/orgs", { slug: slug.value.trim(), ...(name.value.trim() ? { name: name.value.trim() } : {}) });
      await orgsChanged(org.slug);
    } catch (exc) {
      fill(orgMessage, notice("error", exc.message));
    }
  });

  return {
    el: h("section", { class: "stack" },
      h("h1", {}, "Account"),
      h("p", {}, "Signed in as ", h("strong", {}, me.email), me.is_superuser ? " (platform superuser)" : "", ". ",
        h("button", { type: "button", class: "link", onclick: signOut }, "Sign out")),
      h("div", { class: "grid2" }, pwForm, orgForm)),
  };
}
