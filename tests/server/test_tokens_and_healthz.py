"""Token files an operator writes with ordinary tools, and /healthz to every method HTTP checkers send."""

from __future__ import annotations

import gzip
import json
import socket
from pathlib import Path

import pytest

from genserve_server.config import ConfigError, SecurityConfig, load_server_config
from genserve_server.security import auth_interceptor, load_tokens


def _serving() -> tuple[bool, str]:
    """A /healthz probe of a server that serves."""
    return True, ""


def test_a_utf8_bom_is_not_part_of_the_first_token(tmp_path: Path) -> None:
    """PowerShell's `Set-Content -Encoding UTF8` (and other Windows editors) start the file with a
    BOM: it stayed glued to the first token, so the server started and refused every client
    presenting that token as UNAUTHENTICATED."""
    token_file = tmp_path / "tokens"
    token_file.write_bytes("\ufeffalpha\r\nbeta\r\n".encode())
    assert load_tokens(token_file) == (b"alpha", b"beta")


@pytest.mark.parametrize(
    ("content", "line"),
    [("alpha\nt\u00f6ken\n", 2), ("al\tpha\n", 1), ("alpha\nbeta\x00\n", 2)],
)
def test_a_token_no_client_can_send_stops_startup_naming_file_and_line(
    tmp_path: Path, content: str, line: int
) -> None:
    """gRPC metadata values are printable ASCII: a token with a non-ASCII or control character can
    never be presented, so the server 'had' a token nobody could use. Refused at start-up, naming
    the file and line, never the token."""
    token_file = tmp_path / "tokens"
    token_file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{token_file}: line {line}") as info:
        auth_interceptor(SecurityConfig(token_file=token_file))
    assert "t\u00f6ken" not in str(info.value) and "pha" not in str(info.value)


@pytest.mark.parametrize("char", ["\x0c", "\x0b", "\x1c", "\x1e", "\x85", "\u2028"])
def test_a_character_python_counts_as_a_line_break_inside_a_token_stops_startup_not_splits_it(
    tmp_path: Path, char: str
) -> None:
    """The file was split with str.splitlines, which also breaks lines at a form feed, a vertical
    tab, \\x1c-\\x1e, NEL and U+2028: a token holding one (a paste from a terminal or a document)
    became two shorter tokens, each of which authenticated, where docs/operations.md says a token
    with a control or non-ASCII character stops the server. Only \\n (and CRLF's \\r) end a line."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"alpha\nsecond{char}half\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{token_file}: line 2") as info:
        auth_interceptor(SecurityConfig(token_file=token_file))
    assert "second" not in str(info.value) and "half" not in str(info.value)


@pytest.mark.parametrize("char", ["\x0c", "\x0b", "\x1c", "\r", "\x85", "\u2028"])
def test_the_health_probe_reads_the_token_file_by_the_servers_rules(tmp_path: Path, char: str) -> None:
    """The probe split the file with str.splitlines and str.strip: a comment holding a form feed
    (or another of Python's line breaks) gave it a 'token' the server skips as part of the comment,
    so the probe sent it and was refused UNAUTHENTICATED by a healthy server; and a token holding
    one, which stops the server at start, became a shorter token. It reads the server's first."""
    from genserve_server.probe import ProbeError, first_token

    token_file = tmp_path / "tokens"
    token_file.write_text(f"# rotated{char}old-token\nreal-token\n", encoding="utf-8", newline="")
    assert load_tokens(token_file)[0] == b"real-token"
    assert first_token(token_file, None) == "real-token"
    token_file.write_text(f"first{char}half\nsecond\n", encoding="utf-8", newline="")
    with pytest.raises(ProbeError, match=f"--token-file {token_file}: line 1") as info:
        first_token(token_file, None)
    assert "first" not in str(info.value) and "half" not in str(info.value)


def test_the_probe_names_a_token_file_it_cannot_read_once(tmp_path: Path) -> None:
    """--token-file's line said the path and then the OSError's str(), which repeats it as a repr
    (escapes like \\udcc3 under LANG=C): the path once, then why."""
    from genserve_server.probe import ProbeError, first_token

    token_file = tmp_path / "résumé-tokens"
    with pytest.raises(ProbeError) as info:
        first_token(token_file, None)
    assert str(info.value) == f"--token-file {token_file}: No such file or directory"


def test_a_token_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    """A UTF-16 file (Windows PowerShell 5's `>` redirection) failed with "auth: 'utf-8' codec can't
    decode byte 0xff in position 0", naming neither the file nor the source."""
    token_file = tmp_path / "tokens"
    token_file.write_bytes("alpha\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=f"{token_file}.*UTF-8"):
        auth_interceptor(SecurityConfig(token_file=token_file))


def test_a_token_in_the_environment_no_client_can_send_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSERVE_TEST_TOKENS", "alpha,b\u00e9ta")
    with pytest.raises(ConfigError, match="GENSERVE_TEST_TOKENS: token 2") as info:
        auth_interceptor(SecurityConfig(token_env="GENSERVE_TEST_TOKENS"))
    assert "b\u00e9ta" not in str(info.value)


@pytest.mark.parametrize("secret", ["s3cr3t-value", "dG9rZW4=", "9f2c41d0e7", "tok en"])
def test_a_token_given_for_the_token_variables_name_is_refused_without_quoting_it(
    tmp_path: Path, secret: str
) -> None:
    """`--token-env s3cr3t-value` (the token where its variable's name goes) stopped the server with
    'environment variable s3cr3t-value holds no token', and the probe said the same: the secret went
    into the logs. A value no shell variable could be named, with no token under it, is refused
    without quoting it: by the flag, the config file's auth.token_env and the probe alike."""
    from genserve_server.probe import ProbeError, first_token

    refusal = "takes an environment variable's name, not a token"
    with pytest.raises(ConfigError, match=refusal) as info:
        auth_interceptor(SecurityConfig(token_env=secret))
    assert secret not in str(info.value)
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"auth": {"token_env": secret}}))
    with pytest.raises(ConfigError, match=refusal) as info:
        auth_interceptor(load_server_config(config).security)
    assert secret not in str(info.value)
    with pytest.raises(ProbeError, match=refusal) as probe_info:
        first_token(None, secret)
    assert secret not in str(probe_info.value)
    config.write_text(json.dumps({"auth": {"token_env": [secret]}}))  # a list of tokens, not a name
    with pytest.raises(ConfigError, match="auth.token_env must be an environment variable name") as info:
        load_server_config(config)
    assert secret not in str(info.value)


def test_an_unset_token_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A well-formed variable name (a typo, a variable not exported) is still named: it is the
    operator's clue, and no token looks like it was meant as one."""
    from genserve_server.probe import ProbeError, first_token

    monkeypatch.delenv("GENSERVE_TEST_UNSET_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="environment variable GENSERVE_TEST_UNSET_TOKENS holds no token"):
        auth_interceptor(SecurityConfig(token_env="GENSERVE_TEST_UNSET_TOKENS"))
    with pytest.raises(ProbeError, match="GENSERVE_TEST_UNSET_TOKENS holds no token"):
        first_token(None, "GENSERVE_TEST_UNSET_TOKENS")


def test_the_probe_given_both_token_sources_reads_both_as_the_server_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server takes --token-file and --token-env together (both sources, the file's tokens
    first); the probe given the same two flags read the file and ignored the variable, so a variable
    the server refuses to start with (unset, a typo) passed the probe in silence. It reads both by
    the server's rules and sends the server's first token, the file's."""
    from genserve_server.probe import ProbeError, first_token

    token_file = tmp_path / "tokens"
    token_file.write_text("file-token\n")
    monkeypatch.delenv("GENSERVE_TEST_UNSET_TOKENS", raising=False)
    with pytest.raises(ConfigError, match="GENSERVE_TEST_UNSET_TOKENS holds no token"):
        auth_interceptor(SecurityConfig(token_file=token_file, token_env="GENSERVE_TEST_UNSET_TOKENS"))
    with pytest.raises(ProbeError, match="environment variable GENSERVE_TEST_UNSET_TOKENS holds no token"):
        first_token(token_file, "GENSERVE_TEST_UNSET_TOKENS")
    monkeypatch.setenv("GENSERVE_TEST_TOKENS", "env-token")
    assert load_tokens(token_file, "GENSERVE_TEST_TOKENS")[0] == b"file-token"
    assert first_token(token_file, "GENSERVE_TEST_TOKENS") == "file-token"


def test_a_variable_holding_tokens_is_read_whatever_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes lets an env name hold '-' and '.': such a variable holding tokens still works."""
    monkeypatch.setenv("genserve.test-tokens", "alpha,beta")
    assert load_tokens(None, "genserve.test-tokens") == (b"alpha", b"beta")


def _call(app, method: str, path: str) -> tuple[str, dict[str, str], bytes]:  # type: ignore[no-untyped-def]
    seen: dict[str, object] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": ""}, start_response))
    return str(seen["status"]), seen["headers"], body  # type: ignore[return-value]


def test_healthz_gives_the_health_to_every_method_http_checkers_use() -> None:
    """/healthz is for HTTP-only checkers (docs/metrics.md). OPTIONS answered 200 whatever the
    health: HAProxy's `option httpchk /healthz` sends OPTIONS, so a NOT_serving server stayed in
    the pool. HEAD (`curl -I`, uptime probes) answered 405, so a SERVING server looked down."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import Exposition, metrics_app

    state = {"serving": False}
    app = metrics_app(Exposition(CollectorRegistry()), lambda: (state["serving"], "loading"))
    for method in ("GET", "HEAD", "OPTIONS"):
        status, _, body = _call(app, method, "/healthz")
        assert status.startswith("503"), (method, status)
        assert body == (b"not serving: loading\n" if method == "GET" else b""), method
    state["serving"] = True
    for method in ("GET", "HEAD", "OPTIONS"):
        status, headers, body = _call(app, method, "/healthz")
        assert status.startswith("200"), (method, status)
        assert "HEAD" in headers.get("Allow", "HEAD") and body == (b"ok\n" if method == "GET" else b"")
        if method == "HEAD":  # GET's headers without the body: its Content-Length too
            assert headers["Content-Length"] == str(len(b"ok\n"))
    assert _call(app, "POST", "/healthz")[0].startswith("405")


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def test_healthz_on_the_wire_is_answered_by_the_reader_like_the_app_answers() -> None:
    """/healthz is answered before the workers' queue (a scrape flood cannot get it closed
    unanswered): the same status, headers and body as the WSGI app gives, over a real socket."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    state = {"serving": False}
    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), lambda: (state["serving"], "loading"), threads=1)
    port = httpd.server_port
    try:
        answer = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503 ") and answer.endswith(b"\r\n\r\nnot serving: loading\n")
        state["serving"] = True
        head, _, body = _raw(port, b"HEAD /healthz?probe=1 HTTP/1.0\r\n\r\n").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and b"Content-Length: 3" in head and body == b""
        head, _, body = _raw(port, b"OPTIONS /healthz HTTP/1.1\nHost: x\n\n").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and b"Allow: GET,HEAD,OPTIONS" in head and body == b""
        # Everything else still goes to the workers: the metrics, and a 405 for another method.
        assert _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200 ")
        assert _raw(port, b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.0 405")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_malformed_request_line_is_answered_400_at_once_not_after_the_read_timeout() -> None:
    """The reader waits for a request head's blank line; a request line that is no HTTP/1.x line
    (a port scanner's, a typo's) goes to a worker as soon as it is complete and is answered 400
    there, as before the reader, not closed unanswered after metrics_read_timeout_s."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=60)
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=5) as s:
            s.sendall(b"garbage\r\n")  # no blank line follows: the client waits for an answer
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 400 ") and b"400 - Bad request syntax" in answer
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("line", [b"GET  /metrics HTTP/1.1\r\n", b"GET\t/metrics\tHTTP/1.1\r\n"])
def test_a_request_line_with_other_whitespace_waits_in_the_reader_not_in_a_worker(line: bytes) -> None:
    """http.server splits a request line on any whitespace, so 'GET  /metrics HTTP/1.1' (two
    spaces, or tabs) is a request it serves. The reader took it for no HTTP/1.x line (split on one
    space) and handed it to a worker before its head had come: the worker then waited on the client
    for the rest until metrics_read_timeout_s, so a few such half-sent requests held every worker
    and a scrape queued behind them (docs/metrics.md: no thread waits on a client)."""
    import time

    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=30)
    port = httpd.server_port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(line)  # the rest of its head held back
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=3) as scrape:
                scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = scrape.recv(64)
                except TimeoutError:
                    answer = b"(no answer in 3 s: the only worker waits on the half-sent request)"
            assert answer.startswith(b"HTTP/1.0 200 "), answer
            # The held request, once complete, is served as http.server serves it.
            held.sendall(b"Host: x\r\n\r\n")
            assert held.recv(64).startswith(b"HTTP/1.0 200 ")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_client_reading_the_metrics_too_slowly_is_dropped_without_a_traceback(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A scraper that reads its answer slower than metrics_read_timeout_s allows (a stalled
    client, one reading a byte a second) has its connection dropped when the write times out,
    as a client that goes away is; wsgiref printed that TimeoutError's traceback on stderr (raw
    lines among --log-json's records) for each such client."""
    import time

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector

    from genserve_server.metrics_http import serve

    class Big(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield GaugeMetricFamily("big", "x" * 16_000_000, value=1)  # more than the socket buffers

    registry = CollectorRegistry()
    registry.register(Big())
    httpd, _ = serve("127.0.0.1", 0, registry, _serving, threads=1, read_timeout_s=0.5)
    port = httpd.server_port
    try:
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.settimeout(10)
            slow.connect(("127.0.0.1", port))
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert slow.recv(16).startswith(b"HTTP/1.0 200")  # then it reads nothing more
            # The only worker is free again once the slow client's write has timed out.
            started = time.monotonic()
            answer = _raw(port, b"GET /metrics?name[]=none HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.0 200 ") and time.monotonic() - started < 8
    finally:
        httpd.shutdown()
        httpd.server_close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "TimeoutError" not in err, err


def test_a_half_sent_http09_request_waits_in_the_reader_not_in_a_worker() -> None:
    """'GET /metrics' alone on its line (HTTP/0.9's form) is a request after which http.server
    reads header lines up to a blank one, as it does after an HTTP/1.x line. The reader took it
    for a malformed line and handed it to a worker at once, which then waited on the client until
    metrics_read_timeout_s: a few such lines held every worker and a scrape behind them got no
    answer (docs/metrics.md: no thread waits on a client)."""
    import time

    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=30)
    port = httpd.server_port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(b"GET /metrics\r\n")  # its blank line held back
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=3) as scrape:
                scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = scrape.recv(64)
                except TimeoutError:
                    answer = b"(no answer in 3 s: the only worker waits on the half-sent request)"
            assert answer.startswith(b"HTTP/1.0 200 "), answer
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_request_head_past_the_readers_limit_is_answered_431_not_waited_for_in_a_worker() -> None:
    """The reader hands a head past MAX_HEAD_BYTES (64 KiB) without its blank line to a worker,
    taking it for one http.server refuses at once. It refuses only a line over 64 KiB or a 101st
    header: a head of 60 headers of 1.2 KB each is one it reads on, so the worker waited on the
    client for the rest until metrics_read_timeout_s, and a few such clients held every worker
    while the scrapes queued behind them got no answer (docs/metrics.md: no thread waits on a
    client). Such a head is answered 431 and closed."""
    import time

    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import MAX_HEAD_BYTES, serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=30)
    port = httpd.server_port
    head = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1200) for i in range(60))
    assert len(head) > MAX_HEAD_BYTES
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(head)  # its blank line held back
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=3) as scrape:
                scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = scrape.recv(64)
                except TimeoutError:
                    answer = b"(no answer in 3 s: the only worker waits on the long head)"
            assert answer.startswith(b"HTTP/1.0 200 "), answer
            assert held.recv(64).startswith(b"HTTP/1.0 431 ")
        # A request line past the limit is answered too, as the URI too long.
        assert _raw(port, b"GET /" + b"a" * MAX_HEAD_BYTES).startswith(b"HTTP/1.0 414 ")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_healthz_asked_in_absolute_form_gets_the_health_not_the_metrics() -> None:
    """A request's target may be absolute (RFC 9112 3.2.2: a server must accept it; what a checker
    sent through an HTTP proxy, or `curl --proxy`, asks). 'GET http://host/healthz' was answered
    with the metrics, 200, whatever the health (docs/metrics.md: /healthz never returns the
    metrics), so such a checker never saw a server that was not serving."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), lambda: (False, "loading"), threads=1)
    port = httpd.server_port
    try:
        for target in (f"http://127.0.0.1:{port}/healthz", "HTTP://x/healthz?probe=1"):
            answer = _raw(port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert answer.startswith(b"HTTP/1.0 503 "), answer[:200]
            assert answer.endswith(b"\r\n\r\nnot serving: loading\n")
        assert _raw(port, b"GET http://x/metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 200 ")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_head_of_the_metrics_gets_the_headers_of_get_without_the_body() -> None:
    """HTTP requires a server to answer HEAD for what it serves to GET (RFC 9110 9.3.2): `curl -I
    /metrics` and load balancers' HEAD checks got 405. HEAD gets GET's status and headers, its
    Content-Length (and Content-Encoding) included, without the body; HEAD /healthz the health."""
    from prometheus_client import CollectorRegistry, Gauge

    from genserve_server.metrics_http import serve

    registry = CollectorRegistry()
    Gauge("probe_value", "a gauge", registry=registry).set(7)
    state = {"serving": True}
    httpd, _ = serve("127.0.0.1", 0, registry, lambda: (state["serving"], "loading"), threads=1)
    port = httpd.server_port

    def head_of(answer: bytes) -> tuple[str, dict[str, str], bytes]:
        head, _, body = answer.partition(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        headers.pop("Date", None)
        return status, headers, body

    try:
        for encoding in ("identity", "gzip"):
            request = f" /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: {encoding}\r\n\r\n".encode()
            got_status, got_headers, got_body = head_of(_raw(port, b"GET" + request))
            status, headers, body = head_of(_raw(port, b"HEAD" + request))
            assert status == got_status == "HTTP/1.0 200 OK", (encoding, status)
            assert headers == got_headers and body == b"", (encoding, headers, body)
            assert headers["Content-Length"] == str(len(got_body))
            assert b"probe_value" in (gzip.decompress(got_body) if encoding == "gzip" else got_body)
        status, headers, body = head_of(_raw(port, b"OPTIONS /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == "HTTP/1.0 200 OK" and "HEAD" in headers["Allow"].split(","), headers
        for target in ("/healthz", "http://x/healthz"):
            for serving, expected in ((True, "HTTP/1.0 200 OK"), (False, "HTTP/1.0 503 Service Unavailable")):
                state["serving"] = serving
                status, headers, body = head_of(_raw(port, f"HEAD {target} HTTP/1.1\r\n\r\n".encode()))
                assert (status, body) == (expected, b""), (target, status, body)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("reason", ["é" * 600, "model 模型 " * 60, "x" * 498 + "€" * 3])
def test_a_long_not_serving_reason_is_cut_on_a_character_with_its_newline(reason: str) -> None:
    """/healthz's 503 body is held to 512 bytes. It was cut at byte 512 whatever lay there: a reason
    in another script (a model's name, an error's text) ended in half a UTF-8 character, which a
    checker decoding the body as the charset the answer names fails on, and without its newline."""
    from genserve_server.metrics_http import healthz_answer

    status, headers, body = healthz_answer("GET", lambda: (False, reason))
    assert status.startswith("503") and len(body) <= 512
    assert dict(headers)["Content-Length"] == str(len(body))
    text = body.decode("utf-8")  # whole characters only
    assert text.endswith("…\n") and f"not serving: {reason}".startswith(text[:-2]), text
    assert healthz_answer("GET", lambda: (False, "short"))[2] == b"not serving: short\n"


def test_a_render_that_raises_is_answered_500_and_logged_as_one_error_record(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A collector that raises during a render (a custom collector's bug, NVML failing mid-read)
    had wsgiref print its traceback on stderr: raw lines among --log-json's records. It is one
    ERROR record of the server's logger, the traceback in it, and the scraper gets a 500."""
    import logging

    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    from genserve_server.metrics_http import serve

    class Broken(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("the collector broke")

    registry = CollectorRegistry()
    registry.register(Broken())
    httpd, _ = serve("127.0.0.1", 0, registry, _serving, threads=1)
    try:
        with caplog.at_level(logging.ERROR):
            answer = _raw(httpd.server_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert answer.startswith(b"HTTP/1.0 500 "), answer[:200]
    assert b"the collector broke" not in answer  # no internals to the client
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].name.startswith("genserve_server"), errors
    assert errors[0].exc_info is not None and "the collector broke" in caplog.text
    err = capfd.readouterr().err
    assert "Traceback" not in err and "the collector broke" not in err, err


def test_a_not_serving_reason_naming_a_folder_that_is_not_utf_8_is_answered_escaped() -> None:
    """A model folder named in Latin-1 reaches the reason as a lone surrogate (os.fsdecode): the
    body's encode raised, and the probe's connection was closed with no answer."""
    from genserve_server.metrics_http import healthz_answer

    status, _, body = healthz_answer("GET", lambda: (False, "model caf\udce9: no READY version"))
    assert status.startswith("503")
    assert body == b"not serving: model caf\\udce9: no READY version\n"


def test_a_long_method_is_answered_405_cut_on_a_whole_character_ending_in_a_newline() -> None:
    """The 405 body quoting a long method was cut at byte 200: a method of characters \\xa0-\\xff
    (two bytes each in UTF-8) could end in half a character, and any long one lost its newline. It
    is cut as /healthz's body is: on a whole character, the cut marked, the newline kept."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import Exposition, metrics_app

    app = metrics_app(Exposition(CollectorRegistry()), _serving)
    for method in ("P" + "\xe9" * 150, "PU" + "\xe9" * 150, "P" * 300):
        status, headers, body = _call(app, method, "/metrics")
        assert status.startswith("405"), status
        text = body.decode("utf-8")  # no half character
        assert text.startswith(f"# HTTP 405 Method Not Allowed: {method[:20]}"), text
        assert text.endswith("\u2026\n") and len(body) <= 200, text
        assert headers["Content-Length"] == str(len(body))


def test_a_method_with_control_characters_is_answered_405_with_them_escaped() -> None:
    """The 405 body quotes the client's method: its control characters (a terminal escape, a
    backspace) went back raw, so `curl -X` output or a log of the answer could hold a client's
    terminal escapes; they are escaped as every message quoting a client's string is."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1)
    try:
        answer = _raw(httpd.server_port, b"P\x1b[2J\x08UT /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 405 ")
        assert body == b"# HTTP 405 Method Not Allowed: P\\x1b[2J\\x08UT; use OPTIONS, GET or HEAD\n"
        assert f"Content-Length: {len(body)}".encode() in head
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_metrics_port_is_not_served_without_a_health_probe() -> None:
    """Metrics.serve(host, port) without a probe served a /healthz that answered 200 "ok" whatever
    the server's state: an always-ready readiness endpoint for any caller that forgot the probe.
    The probe is a required argument."""
    from genserve_server.metrics import Metrics

    metrics = Metrics(enabled=True)
    try:
        with pytest.raises(TypeError, match="health"):
            metrics.serve("127.0.0.1", 0)  # type: ignore[call-arg]
    finally:
        metrics.close()


def test_a_metrics_server_built_directly_answers_healthz_with_the_probe_it_is_given() -> None:
    """BoundedWSGIServer answered /healthz 200 "ok" unless a subclass overrode probe_health (serve()'s
    did): a direct use had an always-ready readiness endpoint. The probe is a required argument of
    its constructor, and /healthz answers what it says."""
    import threading

    from genserve_server.metrics_http import BoundedWSGIServer, _Handler

    with pytest.raises(TypeError, match="health"):
        BoundedWSGIServer(("127.0.0.1", 0), _Handler)  # type: ignore[call-arg]
    httpd = BoundedWSGIServer(("127.0.0.1", 0), _Handler, health=lambda: (False, "loading"))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        answer = _raw(httpd.server_address[1], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 503 ") and answer.endswith(b"\r\n\r\nnot serving: loading\n")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("path", [b"/healthz", b"/metrics"])
@pytest.mark.parametrize("head_end", [b"\n\r\n", b"\r\n\n"])
def test_a_head_whose_blank_line_follows_a_bare_lf_is_answered_not_left_to_the_read_timeout(
    path: bytes, head_end: bytes
) -> None:
    """http.server ends a request head at the first line that is blank (b'\\r\\n' or b'\\n'), so
    `Host: x\\n\\r\\n` (header lines ending in a bare LF, the blank line in CRLF: printf, a
    hand-written check) is a whole request it serves. The reader must see that end too, not wait
    for `\\r\\n\\r\\n` or `\\n\\n` until metrics_read_timeout_s and close the connection unanswered."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=30)
    try:
        with socket.create_connection(("127.0.0.1", httpd.server_port), timeout=3) as s:
            s.sendall(b"GET " + path + b" HTTP/1.1\nHost: x" + head_end)
            try:
                answer = s.recv(64)
            except TimeoutError:
                answer = b"(no answer in 3 s: the reader still waits for the head's end)"
        assert answer.startswith(b"HTTP/1.0 200 "), answer
    finally:
        httpd.shutdown()
        httpd.server_close()


# The start of a TLS 1.2 ClientHello record (what an `https` scrape job or `curl https://` sends to
# a plaintext port): a handshake record, then bytes that are no HTTP.
_TLS_CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(32) + bytes.fromhex("000020c02bc02f00ff")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"505"),  # HTTP/2's preface (a gRPC client)
        (b"GET /metrics HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /metrics http/1.1\r\n\r\n", b"400"),
        (b"garbage\r\n\r\n", b"400"),
        (_TLS_CLIENT_HELLO + b"\r\n\r\n", b"400"),
    ],
)
def test_a_request_refused_before_its_version_is_known_is_answered_with_a_status_line(
    request_bytes: bytes, status: bytes
) -> None:
    """http.server refuses a request line it cannot parse (HTTP/2, a TLS ClientHello, garbage) as
    it would answer HTTP/0.9: the error page alone, no status line, no headers. A client gets no
    status from that: gRPC said only 'Failed parsing HTTP/2 (... frame type 79)' where an HTTP/1
    status line makes it add 'Trying to connect an http1.x server', Go's net/http (a Prometheus
    `scheme: https` job) says 'first record does not look like a TLS handshake' rather than
    'server gave HTTP response to HTTPS client', curl 'Received HTTP/0.9 when not allowed'."""
    from prometheus_client import CollectorRegistry

    from genserve_server.metrics_http import serve

    httpd, _ = serve("127.0.0.1", 0, CollectorRegistry(), _serving, threads=1, read_timeout_s=30)
    try:
        answer = _raw(httpd.server_port, request_bytes)
        assert answer.startswith(b"HTTP/1.0 " + status + b" "), answer[:80]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: " in head and b"Error code: " + status in body
    finally:
        httpd.shutdown()
        httpd.server_close()
