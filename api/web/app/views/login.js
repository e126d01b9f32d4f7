// Sign in: email, password, "remember me" (30 days instead of 1 hour).
import * as api from "../api.js";
import { field, fill, h, notice } from "../dom.js";

export function renderLogin({ signedIn }) {
  const email = h("input", { type: "email", name: "email", autocomplete: "username", required: true });
  const password = h("input", { type: "password", name: "password", autocomplete: "current-password", required: true });
  const remember = h("input", { type: "checkbox", name: "remember", id: "remember" });
  const message = h("div");
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", { class: "card narrow", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Sign in"),
    field("Email", email),
    field("Password", password),
    h("div", { class: "check" }, remember, h("label", { for: "remember" }, "Remember me for 30 days")),
    message,
    button);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    fill(message);
    try {
      await api.request("POST", "/auth/login",
        { email: email.value.trim(), password: password.value, remember: remember.checked }, { quiet401: true });
      password.value = "";
      await signedIn();
    } catch (exc) {
      const wait = exc.retryAfter ? ` Try again in ${exc.retryAfter} s.` : "";
      fill(message, notice("error", exc.status === 401 ? "Wrong email or password." : `${exc.message}.${wait}`));
      password.focus();
    } finally {
      button.disabled = false;
    }
  });
  queueMicrotask(() => email.focus());
  return { el: h("section", { class: "center" }, form) };
}
