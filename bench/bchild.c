/* The benchmark's helper, compiled with `cc -O2` by bench.py at bench time.
 *
 *   bchild                         the supervised child: sleeps in pause() until a signal ends it
 *                                  (SIGTERM/SIGKILL default action); no protocol, no output, one page
 *                                  of code. Every supervisor runs this same binary.
 *   bchild stamp FILE PROG ARGS..  writes CLOCK_REALTIME (ns) to FILE, then execs PROG: marks the moment
 *                                  a daemon was really spawned (log throughput test)
 *   bchild time N PROG ARGS..      fork+exec+wait PROG N times (stdout/stderr to /dev/null) and print
 *                                  each wall time in ns and the exit status: the control round trip
 *                                  measured without the Python interpreter's spawn overhead
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc >= 4 && strcmp(argv[1], "stamp") == 0) {
        FILE *f = fopen(argv[2], "w");
        if (f) {
            fprintf(f, "%lld\n", now_ns(CLOCK_REALTIME));
            fclose(f);
        }
        execvp(argv[3], argv + 3);
        perror("bchild stamp: exec");
        return 127;
    }
    if (argc >= 4 && strcmp(argv[1], "time") == 0) {
        int n = atoi(argv[2]);
        for (int i = 0; i < n; i++) {
            long long t0 = now_ns(CLOCK_MONOTONIC);
            pid_t pid = fork();
            if (pid == 0) {
                int fd = open("/dev/null", O_WRONLY);
                dup2(fd, 1);
                dup2(fd, 2);
                execvp(argv[3], argv + 3);
                _exit(127);
            }
            int st = 0;
            waitpid(pid, &st, 0);
            long long t1 = now_ns(CLOCK_MONOTONIC);
            printf("%lld %d\n", t1 - t0, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
        }
        return 0;
    }
    for (;;)
        pause();
}
