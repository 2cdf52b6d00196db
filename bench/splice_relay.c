/* The floor for a tunnel relay on this machine: a minimal CONNECT relay in C that moves bytes
 * socket -> pipe -> socket with splice(2) in blocking threads (two per tunnel), no event loop,
 * no checks, loopback destinations only. bench/c_relay.py compiles and runs it for the tunnel
 * bulk scenario: what any relay, however written, costs the machine for the second TCP hop.
 *
 *   splice_relay PORT      listen on 127.0.0.1:PORT; "CONNECT 127.0.0.1:P HTTP/1.1" -> 200
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PIPE_BYTES (1 << 20)

struct direction { int from, to; };

static void *pump(void *arg) {
    struct direction *d = arg;
    int p[2];
    if (pipe(p) == 0) {
        fcntl(p[1], F_SETPIPE_SZ, PIPE_BYTES);
        for (;;) {
            ssize_t n = splice(d->from, NULL, p[1], NULL, PIPE_BYTES, SPLICE_F_MOVE);
            if (n <= 0) break;
            while (n > 0) {
                ssize_t m = splice(p[0], NULL, d->to, NULL, (size_t)n, SPLICE_F_MOVE);
                if (m <= 0) goto out;
                n -= m;
            }
        }
    out:
        close(p[0]);
        close(p[1]);
    }
    shutdown(d->to, SHUT_WR);
    return NULL;
}

static int dial(int port) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s >= 0 && connect(s, (struct sockaddr *)&to, sizeof to) != 0) {
        close(s);
        return -1;
    }
    return s;
}

static void *tunnel(void *arg) {
    int client = (int)(long)arg, upstream = -1, one = 1;
    char head[4096];
    size_t got = 0;
    /* The request head, byte by byte: nothing after it may be read here. */
    while (got < 4 || memcmp(head + got - 4, "\r\n\r\n", 4) != 0) {
        if (got == sizeof head - 1 || read(client, head + got, 1) != 1) goto done;
        got++;
    }
    head[got] = 0;
    char *colon = strchr(head, ':');
    int port = colon ? atoi(colon + 1) : 0;
    if (strncmp(head, "CONNECT 127.0.0.1:", 18) != 0 || port <= 0 || (upstream = dial(port)) < 0) {
        const char *no = "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n";
        (void)!write(client, no, strlen(no));
        goto done;
    }
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(upstream, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const char *yes = "HTTP/1.1 200 Connection established\r\n\r\n";
    if (write(client, yes, strlen(yes)) < 0) goto done;
    struct direction up = {client, upstream}, down = {upstream, client};
    pthread_t other;
    if (pthread_create(&other, NULL, pump, &up) != 0) goto done;
    pump(&down);
    pthread_join(other, NULL);
done:
    if (upstream >= 0) close(upstream);
    close(client);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (struct sockaddr *)&at, sizeof at) != 0 || listen(listener, 128) != 0) {
        perror("splice_relay");
        return 1;
    }
    for (;;) {
        int client = accept(listener, NULL, NULL);
        if (client < 0) continue;
        pthread_t t;
        if (pthread_create(&t, NULL, tunnel, (void *)(long)client) != 0) {
            close(client);
            continue;
        }
        pthread_detach(t);
    }
}
