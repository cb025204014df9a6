/*
 * Guest side of the harness's command channel: the program /init keeps running
 * on its serial port (harness.guest.AgentSession is the host side).
 *
 * Protocol, one request per line:
 *   host:  <token> <timeout-seconds> <base64 of a shell script>
 *   guest: @@B<token>\n <stdout> \n@@M<token>\n <stderr> \n@@E<token> <rc>\n
 * and, once, at start: @@READY <kernel release>\n
 *
 * A request whose third field starts with '!' (never base64) is one of the
 * agent's own commands, answered in the same frame without a fork:
 *   !klog N   stdout: the number of lines in the kernel log, a newline, then
 *             base64 of the zlib-compressed text of its lines after the first N,
 *             the log read as busybox `dmesg` reads it (klogctl, the <level>
 *             prefixes dropped). The windows of the guest tests read the log
 *             this way: `dmesg | wc -l` and `dmesg | tail` cost three programs
 *             each, 45-55 ms under TCG, and the serial port moves a compressed
 *             log in a third of the time.
 *
 * The port: a tty (`harness-agent /dev/ttyS1`, the 16550 beside the console) or
 * `harness-agent --virtio-port NAME`, the virtio-serial port the host named NAME
 * (found in /sys/class/virtio-ports), which moves bulk replies such as the kernel
 * log several times faster under TCG.
 *
 * `harness-agent --insmod LIST` loads the modules LIST names (paths under
 * /lib/modules, one a line, in order) with finit_module, for /init: busybox
 * insmod was a program for each module, 10-40 ms apiece under TCG.
 *
 * Each command is `sh SCRIPT` in a process group of its own, stdin /dev/null,
 * stdout straight to the port, stderr to a file sent after it. Past its timeout
 * the whole group is killed (rc 137, as `timeout -s KILL` gave); rc is the
 * shell's exit status, or 128 + the signal that ended it.
 *
 * A program, not a shell script: under TCG every fork+exec costs 10-40 ms, and
 * the script needed four per command (base64, timeout, sh, cat) and one more,
 * stty, at start. This one needs one per command (sh), and none at start.
 * Static, built on the host by harness.tools, so any kernel's initramfs can
 * carry it.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/klog.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define SCRIPT "/tmp/.harness-cmd"
#define ERRORS "/tmp/.harness-err"

static int port;
static int port_is_virtio;
static volatile sig_atomic_t expired;

static void on_alarm(int sig)
{
	(void)sig;
	expired = 1;
}

/* All of buf to the port; a port that is gone ends the agent (init starts another). */
static void put(const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(port, buf, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			exit(1);
		buf += n;
		len -= (size_t)n;
	}
}

static void puts_port(const char *s)
{
	put(s, strlen(s));
}

/* One line from the port, without its newline, in a buffer that grows; NULL at EOF. */
static char *get_line(void)
{
	static char *buf;
	static size_t cap, have, start;
	if (start > 0) {
		memmove(buf, buf + start, have - start);
		have -= start;
		start = 0;
	}
	for (;;) {
		char *nl = memchr(buf, '\n', have);
		if (nl != NULL) {
			*nl = '\0';
			start = (size_t)(nl - buf) + 1;
			return buf;
		}
		if (have == cap) {
			cap = cap ? cap * 2 : 65536;
			buf = realloc(buf, cap);
			if (buf == NULL)
				exit(1);
		}
		ssize_t n = read(port, buf + have, cap - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0 && port_is_virtio) {
			/* A virtio-serial port reads as EOF while its host side is not
			 * connected; the host connects before the guest runs and
			 * leaves with QEMU, so this is a wait, not an end. */
			const struct timespec pause = { 0, 5000000 };
			nanosleep(&pause, NULL);
			continue;
		}
		if (n <= 0)
			return NULL;
		have += (size_t)n;
	}
}

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* Decodes base64 text in place; returns the length of the bytes. */
static size_t b64_decode(char *text)
{
	size_t out = 0;
	unsigned int acc = 0;
	int bits = 0;
	for (const char *p = text; *p != '\0' && *p != '='; p++) {
		int v = b64_value((unsigned char)*p);
		if (v < 0)
			continue;
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			text[out++] = (char)((acc >> bits) & 0xff);
		}
	}
	return out;
}

static int write_file(const char *path, const char *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	while (len > 0) {
		ssize_t n = write(fd, data, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			close(fd);
			return -1;
		}
		data += n;
		len -= (size_t)n;
	}
	return close(fd);
}

static int run(unsigned int timeout)
{
	int err = open(ERRORS, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	pid_t pid = fork();
	if (pid == 0) {
		int null = open("/dev/null", O_RDONLY);
		setpgid(0, 0);
		signal(SIGPIPE, SIG_DFL); /* an ignored signal would stay ignored in the command */
		if (null > 0) {
			dup2(null, 0);
			close(null);
		}
		dup2(port, 1);
		if (err >= 0)
			dup2(err, 2);
		execl("/bin/sh", "sh", SCRIPT, (char *)NULL);
		_exit(127);
	}
	if (err >= 0)
		close(err);
	if (pid < 0)
		return 126;
	setpgid(pid, pid); /* also here: the group exists before any kill below */
	expired = 0;
	alarm(timeout > 0 ? timeout : 1);
	int status = 0;
	for (;;) {
		pid_t got = waitpid(pid, &status, 0);
		if (got == pid)
			break;
		if (got < 0 && errno != EINTR)
			break;
		if (expired) {
			kill(-pid, SIGKILL);
			expired = 0;
		}
	}
	alarm(0);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

static void send_errors(void)
{
	char buf[65536];
	int fd = open(ERRORS, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		put(buf, (size_t)n);
	}
	close(fd);
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* len bytes to the port as base64, in one line. */
static void put_base64(const unsigned char *data, size_t len)
{
	char out[4096];
	size_t used = 0;
	for (size_t i = 0; i < len; i += 3) {
		unsigned int v = (unsigned int)data[i] << 16;
		if (i + 1 < len)
			v |= (unsigned int)data[i + 1] << 8;
		if (i + 2 < len)
			v |= data[i + 2];
		out[used++] = B64[(v >> 18) & 63];
		out[used++] = B64[(v >> 12) & 63];
		out[used++] = i + 1 < len ? B64[(v >> 6) & 63] : '=';
		out[used++] = i + 2 < len ? B64[v & 63] : '=';
		if (used > sizeof(out) - 4) {
			put(out, used);
			used = 0;
		}
	}
	put(out, used);
}

/* `!klog N` (see the top): returns the exit status; a message for stderr in *why. */
static int klog(const char *arg, const char **why)
{
	char *end;
	unsigned long skip = strtoul(arg, &end, 10);
	if (end == arg || *end != '\0') {
		*why = "harness-agent: usage: !klog LINES-TO-SKIP";
		return 2;
	}
	int size = klogctl(10, NULL, 0); /* SYSLOG_ACTION_SIZE_BUFFER */
	if (size < 16 * 1024)
		size = 16 * 1024;
	char *raw = malloc((size_t)size + 1);
	char *text = malloc((size_t)size + 2);
	if (raw == NULL || text == NULL) {
		free(raw);
		free(text);
		*why = "harness-agent: out of memory";
		return 1;
	}
	int len = klogctl(3, raw, size); /* SYSLOG_ACTION_READ_ALL */
	if (len < 0) {
		*why = errno == EPERM ? "harness-agent: klogctl: Operation not permitted" : "harness-agent: klogctl failed";
		free(raw);
		free(text);
		return 1;
	}
	/* As busybox dmesg prints it: no <level> at the start of a line, a newline at the end. */
	size_t n = 0;
	int line_start = 1;
	for (int i = 0; i < len; i++) {
		if (line_start && raw[i] == '<') {
			while (i < len && raw[i] != '>')
				i++;
			line_start = 0;
			continue;
		}
		text[n++] = raw[i];
		line_start = raw[i] == '\n';
	}
	if (n > 0 && text[n - 1] != '\n')
		text[n++] = '\n';
	free(raw);
	unsigned long lines = 0;
	size_t from = n;
	for (size_t i = 0; i < n; i++) {
		if (lines == skip && from == n)
			from = i;
		if (text[i] == '\n')
			lines++;
	}
	char head[32];
	snprintf(head, sizeof(head), "%lu\n", lines);
	puts_port(head);
	uLongf packed_len = compressBound((uLong)(n - from));
	unsigned char *packed = malloc(packed_len);
	if (packed == NULL || compress2(packed, &packed_len, (const Bytef *)text + from, (uLong)(n - from), 1) != Z_OK) {
		free(packed);
		free(text);
		*why = "harness-agent: compressing the kernel log failed";
		return 1;
	}
	free(text);
	put_base64(packed, packed_len);
	puts_port("\n");
	free(packed);
	return 0;
}

/* `--insmod LIST` (see the top): each failure goes to the kernel log, as /init reported them. */
static int insmod_all(const char *list)
{
	FILE *f = fopen(list, "re");
	if (f == NULL)
		return 0;
	int kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	char name[4096], path[4200];
	while (fgets(name, sizeof(name), f) != NULL) {
		name[strcspn(name, "\n")] = '\0';
		if (name[0] == '\0')
			continue;
		snprintf(path, sizeof(path), "/lib/modules/%s", name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0 && syscall(SYS_finit_module, fd, "", 0) == 0) {
			close(fd);
			continue;
		}
		int e = errno;
		if (fd >= 0)
			close(fd);
		if (e == EEXIST)
			continue;
		char msg[4400];
		int m = snprintf(msg, sizeof(msg), "harness-init: insmod %s failed: %s\n", name, strerror(e));
		if (kmsg >= 0 && m > 0 && write(kmsg, msg, (size_t)m) < 0)
			break;
	}
	fclose(f);
	if (kmsg >= 0)
		close(kmsg);
	return 0;
}

/* The device node of the virtio-serial port called `name`, waiting up to `seconds` for the
 * driver to add it (the host's control messages announce ports after the device is probed). */
static int virtio_port(const char *name, char *path, size_t size, int seconds)
{
	const struct timespec pause = { 0, 2000000 };
	for (long tries = (long)seconds * 500; tries > 0; tries--) {
		DIR *dir = opendir("/sys/class/virtio-ports");
		struct dirent *entry;
		while (dir != NULL && (entry = readdir(dir)) != NULL) {
			char file[512], text[256];
			if (entry->d_name[0] == '.')
				continue;
			snprintf(file, sizeof(file), "/sys/class/virtio-ports/%s/name", entry->d_name);
			int fd = open(file, O_RDONLY | O_CLOEXEC);
			if (fd < 0)
				continue;
			ssize_t n = read(fd, text, sizeof(text) - 1);
			close(fd);
			text[n > 0 ? n : 0] = '\0';
			text[strcspn(text, "\n")] = '\0';
			if (strcmp(text, name) == 0) {
				snprintf(path, size, "/dev/%s", entry->d_name);
				closedir(dir);
				if (access(path, F_OK) == 0)
					return 0;
				dir = NULL; /* devtmpfs has not made the node yet */
				break;
			}
		}
		if (dir != NULL)
			closedir(dir);
		nanosleep(&pause, NULL);
	}
	return -1;
}

static void to_kmsg(const char *text)
{
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		ssize_t ignored = write(fd, text, strlen(text));
		(void)ignored;
		close(fd);
	}
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "--insmod") == 0)
		return insmod_all(argv[2]);
	char path[300];
	const char *device = argc == 2 ? argv[1] : NULL;
	if (argc == 3 && strcmp(argv[1], "--virtio-port") == 0) {
		if (virtio_port(argv[2], path, sizeof(path), 10) != 0) {
			char msg[400];
			snprintf(msg, sizeof(msg), "harness-agent: no virtio-serial port named %s after 10 s "
				 "(virtio_console not loaded, or no such port on the command line)\n", argv[2]);
			to_kmsg(msg);
			return 1;
		}
		device = path;
		port_is_virtio = 1;
	}
	if (device == NULL) {
		fprintf(stderr, "usage: harness-agent /dev/ttySn | --virtio-port NAME | --insmod LIST\n");
		return 2;
	}
	/* A session of its own (what `setsid` in /init gave, without a program more). */
	setsid();
	/* Not the agent's controlling terminal: a command that opens /dev/tty or sets
	 * the line's modes cannot write into the protocol or be stopped by job control. */
	port = open(device, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (port < 0) {
		perror(device);
		return 1;
	}
	/* Raw: no byte of the output translated, no echo, no signals from the line. */
	struct termios tio;
	if (tcgetattr(port, &tio) == 0) {
		cfmakeraw(&tio);
		tio.c_cc[VMIN] = 1;
		tio.c_cc[VTIME] = 0;
		tcsetattr(port, TCSANOW, &tio);
	}
	if (chdir("/") != 0)
		return 1;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm; /* no SA_RESTART: waitpid returns EINTR */
	sigaction(SIGALRM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	char release[256] = "unknown";
	int fd = open("/proc/sys/kernel/osrelease", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		ssize_t n = read(fd, release, sizeof(release) - 1);
		release[n > 0 ? n : 0] = '\0';
		release[strcspn(release, "\n")] = '\0';
		close(fd);
	}
	char line[512];
	snprintf(line, sizeof(line), "@@READY %s\n", release);
	puts_port(line);

	char *request;
	while ((request = get_line()) != NULL) {
		char *save = NULL;
		char *token = strtok_r(request, " ", &save);
		char *timeout = strtok_r(NULL, " ", &save);
		char *payload = strtok_r(NULL, " ", &save);
		if (token == NULL || timeout == NULL)
			continue;
		if (payload != NULL && payload[0] == '!') {
			const char *why = NULL;
			int rc = 127;
			snprintf(line, sizeof(line), "@@B%s\n", token);
			puts_port(line);
			if (strcmp(payload, "!klog") == 0)
				rc = klog(strtok_r(NULL, " ", &save) ?: "", &why);
			else
				why = "harness-agent: no such command of its own";
			snprintf(line, sizeof(line), "\n@@M%s\n", token);
			puts_port(line);
			if (why != NULL)
				puts_port(why);
			snprintf(line, sizeof(line), "\n@@E%s %d\n", token, rc);
			puts_port(line);
			continue;
		}
		size_t len = payload != NULL ? b64_decode(payload) : 0;
		int saved = write_file(SCRIPT, payload != NULL ? payload : "", len);
		int rc = 126;
		snprintf(line, sizeof(line), "@@B%s\n", token);
		puts_port(line);
		if (saved == 0)
			rc = run((unsigned int)strtoul(timeout, NULL, 10));
		snprintf(line, sizeof(line), "\n@@M%s\n", token);
		puts_port(line);
		if (saved == 0)
			send_errors();
		else
			puts_port("harness-agent: cannot write " SCRIPT " (/tmp full?)");
		snprintf(line, sizeof(line), "\n@@E%s %d\n", token, rc);
		puts_port(line);
	}
	return 0;
}
