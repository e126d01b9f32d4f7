/* Load generator for bench/ingest.py: one MQTT connection publishing stamped
 * 3-metric telemetry at QoS 1 with a bounded in-flight window.
 *
 * Written in C on libmosquitto because a Python publisher saturates a core at
 * ~12k QoS-1 msg/s on the reference machine and would measure itself, not the
 * bridge (shared/REFERENCE-MEASUREMENTS.md).
 *
 * usage: pub HOST PORT USER PASSWORD CLIENT_ID TOPIC COUNT WINDOW [TS_START_MS [RATE]]
 * RATE: messages per second, evenly spaced (0 or absent: as fast as the window allows).
 * Prints "published N in S s" on stdout when every message is acknowledged.
 */
#include <mosquitto.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static long acked = 0;
static int connected = 0;

static void on_connect(struct mosquitto *m, void *ud, int rc) {
    (void)m; (void)ud;
    pthread_mutex_lock(&lock);
    connected = rc == 0 ? 1 : -rc - 1000;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static void on_publish(struct mosquitto *m, void *ud, int mid) {
    (void)m; (void)ud; (void)mid;
    pthread_mutex_lock(&lock);
    acked++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 9) {
        fprintf(stderr, "usage: pub HOST PORT USER PASSWORD CLIENT_ID TOPIC COUNT WINDOW [TS_START_MS [RATE]]\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    long count = atol(argv[7]);
    long window = atol(argv[8]);
    long long ts = argc > 9 ? atoll(argv[9]) : (long long)time(NULL) * 1000;
    double rate = argc > 10 ? atof(argv[10]) : 0;

    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new(argv[5], true, NULL);
    mosquitto_username_pw_set(m, argv[3], argv[4]);
    mosquitto_connect_callback_set(m, on_connect);
    mosquitto_publish_callback_set(m, on_publish);
    mosquitto_max_inflight_messages_set(m, (unsigned int)window);
    if (mosquitto_connect(m, host, port, 60) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "pub: cannot connect to %s:%d\n", host, port);
        return 1;
    }
    mosquitto_loop_start(m);
    pthread_mutex_lock(&lock);
    while (connected == 0) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    if (connected != 1) {
        fprintf(stderr, "pub: connection refused (%d)\n", connected + 1000);
        return 1;
    }
    char payload[256];
    double t0 = now();
    for (long i = 0; i < count; i++) {
        if (rate > 0) {  /* message i is due at t0 + i / rate; never sent early */
            double wait = t0 + i / rate - now();
            if (wait > 0) {
                struct timespec d = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                nanosleep(&d, NULL);
            }
        }
        pthread_mutex_lock(&lock);
        while (i - acked >= window) pthread_cond_wait(&cond, &lock);
        pthread_mutex_unlock(&lock);
        int n = snprintf(payload, sizeof payload,
                         "{\"ts\":%lld,\"values\":{\"temp\":%.2f,\"hum\":%ld,\"bat\":%.3f}}",
                         ts + i, 20.0 + (i % 100) / 10.0, 30 + i % 50, 3.7 - (i % 10) / 100.0);
        int rc = mosquitto_publish(m, NULL, argv[6], n, payload, 1, false);
        if (rc != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "pub: publish failed: %s\n", mosquitto_strerror(rc));
            return 1;
        }
    }
    pthread_mutex_lock(&lock);
    while (acked < count) pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    double dt = now() - t0;
    printf("published %ld in %.3f s\n", count, dt);
    mosquitto_disconnect(m);
    mosquitto_loop_stop(m, false);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    return 0;
}
