/*
 * lms_retain: a Mosquitto 2.0 broker plugin (plugin API version 5) that refuses retained
 * messages from devices everywhere under the platform's topic root except their `status`.
 *
 * Why: dynamic-security's ACL types do not look at the retain flag, and `retain_available
 * false` is broker-wide, which would also take away what is retained by design: a device's
 * `status` (its Last Will and "online") and the cloud->device `config` the platform's
 * service account publishes. Without this plugin one device login could retain one message
 * per topic on every device->cloud topic it may publish to (commands/<anything>/result is
 * unbounded) and so fill the broker's memory (bridge/retained.py only clears them later).
 *
 * How: an ACL-check callback. Mosquitto 2.0 calls the ACL-check callbacks of all plugins in
 * the order they were registered (the order of the `plugin` lines) and the first answer that
 * is not MOSQ_ERR_PLUGIN_DEFER decides (src/security.c, mosquitto_acl_check). So this plugin
 * is loaded before dynamic-security, answers MOSQ_ERR_ACL_DENIED for what it refuses, and
 * MOSQ_ERR_PLUGIN_DEFER for everything else, which dynamic-security then decides as before:
 * this plugin never grants anything.
 *
 * Refused: a write (a PUBLISH, or a Will when it is sent) with the retain flag set, on a
 * topic under the root that is not a device's status (exactly `<root>/<org>/<device>/status`),
 * by any login other than the service account. The Will goes through the same check (with
 * MOSQ_ACL_WRITE and the Will's retain flag) when the broker sends it, so a retained Will on
 * `status` passes and one elsewhere is dropped. A refused QoS 1 PUBLISH is answered with
 * PUBACK 0x87 (not authorised) under MQTT 5; MQTT 3.1.1 has no reason codes, so there it is
 * acknowledged and dropped. The message is not delivered either: firmware never sets the
 * retain flag outside `status`, so only a misbehaving login loses anything.
 *
 * Why refuse rather than clear the flag: in 2.0 a MOSQ_EVT_MESSAGE callback may set
 * `retain` false and the broker then stores and delivers the message unretained, but that
 * event runs only for PUBLISH packets (after this ACL check), never for a Will, which the
 * broker queues directly. A Will would then be a way around it (one retained message per
 * connection, on a new commands/<id>/result each time), and an ACL check cannot tell a
 * Will's write from a PUBLISH's. One rule here covers both.
 *
 * Options (plugin_opt_*):
 *   topic_root    the platform's topic root (default "lms")
 *   service_user  the username of the platform's service account (required), which
 *                 retains `config` and clears retained messages (empty retained publishes)
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

struct lms_retain {
	mosquitto_plugin_id_t *id;
	char *root;          /* topic root, without slashes */
	size_t root_len;
	char *service_user;  /* exempt username */
};

/* A single instance: the plugin is loaded once (per_listener_settings false). */
static struct lms_retain state;

/* True when `topic` is `<root>/<org>/<device>/status`: the only place a device retains. */
static bool is_device_status(const char *topic)
{
	int levels = 1;
	const char *last = topic;

	for(const char *p = topic; *p; p++){
		if(*p == '/'){
			levels++;
			last = p + 1;
		}
	}
	return levels == 4 && strcmp(last, "status") == 0;
}

/* True when `topic` is the root itself or lies under it. */
static bool under_root(const char *topic)
{
	return strncmp(topic, state.root, state.root_len) == 0
		&& (topic[state.root_len] == '\0' || topic[state.root_len] == '/');
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username;

	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_WRITE || !ed->retain || ed->topic == NULL){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	if(!under_root(ed->topic) || is_device_status(ed->topic)){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	username = mosquitto_client_username(ed->client);
	if(username != NULL && strcmp(username, state.service_user) == 0){
		return MOSQ_ERR_PLUGIN_DEFER;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE,
			"lms_retain: refused a retained message from %s (user %s) on %s",
			mosquitto_client_id(ed->client), username ? username : "-", ed->topic);
	return MOSQ_ERR_ACL_DENIED;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	const char *root = "lms";
	const char *service_user = NULL;

	for(int i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "topic_root") == 0){
			root = options[i].value;
		}else if(strcmp(options[i].key, "service_user") == 0){
			service_user = options[i].value;
		}
	}
	/* A root with a slash or a wildcard would never match a topic's first level. */
	if(root == NULL || root[0] == '\0' || strpbrk(root, "/+#") != NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR, "lms_retain: plugin_opt_topic_root must be one topic level");
		return MOSQ_ERR_INVAL;
	}
	/* Without it the platform could not retain `config`: refuse to start rather than guess. */
	if(service_user == NULL || service_user[0] == '\0'){
		mosquitto_log_printf(MOSQ_LOG_ERR, "lms_retain: plugin_opt_service_user is required");
		return MOSQ_ERR_INVAL;
	}

	state.id = identifier;
	state.root = mosquitto_strdup(root);
	state.service_user = mosquitto_strdup(service_user);
	if(state.root == NULL || state.service_user == NULL){
		mosquitto_free(state.root);
		mosquitto_free(state.service_user);
		return MOSQ_ERR_NOMEM;
	}
	state.root_len = strlen(state.root);
	*userdata = &state;

	mosquitto_log_printf(MOSQ_LOG_INFO,
			"lms_retain: devices may retain only %s/+/+/status; %s is exempt",
			state.root, state.service_user);
	return mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;

	if(state.id != NULL){
		mosquitto_callback_unregister(state.id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	}
	mosquitto_free(state.root);
	mosquitto_free(state.service_user);
	memset(&state, 0, sizeof(state));
	return MOSQ_ERR_SUCCESS;
}
