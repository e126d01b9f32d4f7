// Pieces several views share.
import { h } from "../dom.js";

/**
 * A secret shown once (device credentials, an API key, a technician login, a webhook
 * secret): label/value pairs as selectable text, optional ready command lines, and a button
 * that removes it. Focus moves to it so keyboard and screen-reader users land on it.
 */
export function secretBox(title, pairs, lines = []) {
  const box = h("section", { class: "secret card", tabindex: "-1", "aria-label": title, role: "region" },
    h("h3", {}, title),
    h("p", { class: "warn" }, "Shown only now: copy it somewhere safe."),
    h("dl", { class: "pairs" }, pairs.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, h("code", {}, v))))),
    lines.map(([label, text]) => h("div", { class: "cmdline" }, h("span", { class: "muted" }, label), h("pre", {}, h("code", {}, text)))),
    h("button", { type: "button", onclick: () => box.remove() }, "Done, hide it"));
  queueMicrotask(() => box.focus());
  return box;
}

/** Shell-quote for a command line shown to copy (single quotes). */
export function shq(s) {
  return `'${String(s).replace(/'/g, "'\\''")}'`;
}

/** The mosquitto_pub line that publishes as a device with its fresh credentials. */
export function devicePubLine(creds) {
  let host = "127.0.0.1";
  let port = "1883";
  try {
    const u = new URL(creds.mqtt_url.replace(/^mqtts?:/, "http:"));
    host = u.hostname;
    port = u.port || "1883";
  } catch {
    // keep the defaults
  }
  const tls = creds.mqtt_url.startsWith("mqtts:") ? " --capath /etc/ssl/certs" : "";
  return `mosquitto_pub -h ${host} -p ${port}${tls} -u ${shq(creds.username)} -P ${shq(creds.password)} ` +
    `-i ${shq(creds.client_id)} -q 1 -t ${shq(`${creds.topic_prefix}/telemetry`)} -m '{"temp": 21.5}'`;
}

export function credentialsBox(title, creds) {
  return secretBox(title, [["MQTT URL", creds.mqtt_url], ["username", creds.username],
    ["password", creds.password], ["client id", creds.client_id], ["topic prefix", creds.topic_prefix]],
  [["publish as it:", devicePubLine(creds)]]);
}
