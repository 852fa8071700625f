"""The URL-list download's own fetch: http(s) only, public addresses only unless the data set opts in, a bounded body.

img2dataset fetches with `urllib.request.urlopen`, which follows every scheme urllib knows (a `file://`
URL read the Ray auth token out of the home folder in a probe), connects wherever a name resolves
(169.254.169.254, the cloud's metadata service, included) and reads a body whole. Here:
- a URL whose scheme is not http or https is refused before anything is opened (`unsupported URL scheme`);
- each connection resolves its host once, judges every address (`address_problem`) and connects to the
  judged address itself, so a name that resolves elsewhere a second time (DNS rebinding) gets nowhere;
  every redirect hop is a new request through the same opener, so its scheme and address are judged again;
- no proxy is used (a proxy would connect to the target on our behalf, out of reach of the address check);
- a body whose Content-Length exceeds `max_bytes` is refused before it is read, and any other is read with
  a cap (`response body too large`); one shorter than its Content-Length is an IncompleteRead (truncated).

img2dataset has no hook for its fetch: `guarded(policy)` swaps its module-level `download_image` for ours
for the duration of one shard, in our own task process (`url_shards.download_shard`), and puts it back.
The refusals are messages `schema.classify` counts as `unsupported_scheme`, `blocked_address`, `too_large`.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

SCHEMES = ("http", "https")
_CHUNK = 1 << 16
_SWAP = threading.Lock()  # one shard's fetch at a time may own img2dataset's module


class Refused(OSError):
    """A fetch the rules refuse. An OSError, so that urllib treats it as it treats any failed connection."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool  # the data set's manifest opts in to loopback and private-network servers
    max_bytes: int  # the stage's `max_image_bytes`


def address_problem(ip: str, allow_private: bool) -> str | None:
    """Why a connection to `ip` is refused, or None. Link-local (the metadata service), multicast and unspecified
    addresses are refused always: no image server lives there, and the opt-in exists for test and lab servers."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])  # an IPv6 link-local address may carry a zone: fe80::1%eth0
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254 on the wire
    for kind, hit in (("link-local", addr.is_link_local), ("multicast", addr.is_multicast),
                      ("unspecified", addr.is_unspecified)):
        if hit:
            return kind
    if allow_private:
        return None
    if addr.is_loopback:
        return "loopback"
    return None if addr.is_global else "private"


def connect_judged(address: tuple[str, int], timeout, source_address=None, *, allow_private: bool) -> socket.socket:
    """`socket.create_connection`, but every address the host resolves to is judged first and the socket goes to a
    judged address, never to a name resolved again."""
    host, port = address
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        problem = address_problem(sockaddr[0], allow_private)
        if problem:
            raise Refused(f"blocked address {sockaddr[0]} ({problem}) for host {host}")
    error: OSError | None = None
    for *_, sockaddr in infos:
        try:
            return socket.create_connection((sockaddr[0], port), timeout, source_address)
        except OSError as e:
            error = e
    raise error or OSError(f"{host} resolves to no address")


def _judged(connection_class: type, allow_private: bool):
    """A factory of `connection_class` whose sockets come from `connect_judged` (http.client's hook for that)."""

    def make(host, **kwargs):
        conn = connection_class(host, **kwargs)
        conn._create_connection = functools.partial(connect_judged, allow_private=allow_private)
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self._connection = _judged(http.client.HTTPConnection, allow_private)

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self._connection = _judged(http.client.HTTPSConnection, allow_private)

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, each hop's scheme judged first (urllib itself would follow one to ftp, and refuses others
    with an HTTP error that would hide why); the hop's address is judged when it connects."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            try:
                scheme_problem(urllib.parse.urljoin(req.full_url, location))
            except Refused:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def scheme_problem(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise Refused(f"unsupported URL scheme {scheme!r} (only http and https are fetched)")


def opener(allow_private: bool) -> urllib.request.OpenerDirector:
    """An opener with only the handlers a download needs: no file, ftp or data handler, no proxy."""
    director = urllib.request.OpenerDirector()
    for handler in (_HTTPHandler(allow_private), _HTTPSHandler(allow_private), _RedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    urllib.request.UnknownHandler()):
        director.add_handler(handler)
    return director


def read_capped(response, max_bytes: int) -> bytes:
    """The body, refused from its Content-Length when that says it is too large, else read at most one byte past
    `max_bytes`; a body shorter than its Content-Length raises IncompleteRead, as a whole read would."""
    declared = response.headers.get("Content-Length", "").strip()
    expected = int(declared) if declared.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise Refused(f"response body too large: Content-Length {expected} > max_image_bytes {max_bytes}")
    body = bytearray()
    while len(body) <= max_bytes:
        chunk = response.read(min(_CHUNK, max_bytes + 1 - len(body)))
        if not chunk:
            break
        body += chunk
    if len(body) > max_bytes:
        raise Refused(f"response body too large: more than max_image_bytes {max_bytes}")
    if expected is not None and len(body) < expected:
        raise http.client.IncompleteRead(bytes(body), expected - len(body))
    return bytes(body)


def user_agent(token: str | None) -> str:
    return f"Mozilla/5.0 (compatible; {token})" if token else "Mozilla/5.0"


def fetcher(policy: FetchPolicy):
    """A stand-in for img2dataset's `download_image(row, timeout, user_agent_token, disallowed_header_directives)`,
    returning what it returns: (key, a stream of the body or None, the error message or None)."""
    from img2dataset.downloader import is_disallowed

    director = opener(policy.allow_private)

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        try:
            scheme_problem(url)
            request = urllib.request.Request(url, headers={"User-Agent": user_agent(user_agent_token)})
            with director.open(request, timeout=timeout) as response:
                if disallowed_header_directives and is_disallowed(response.headers, user_agent_token,
                                                                  disallowed_header_directives):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                return key, io.BytesIO(read_capped(response, policy.max_bytes)), None
        except urllib.error.URLError as e:  # a refusal at connect time arrives wrapped: its own words are the reason
            return key, None, str(e.reason if isinstance(e.reason, Refused) else e)
        except Exception as e:  # noqa: BLE001 - every failure is the row's, as in img2dataset
            return key, None, str(e)

    return download_image


@contextmanager
def guarded(policy: FetchPolicy):
    """img2dataset's fetch replaced by `fetcher(policy)` for the block (its Downloader looks the function up at each
    call), in this process only, one block at a time."""
    import img2dataset.downloader as module

    with _SWAP:
        original = module.download_image
        module.download_image = fetcher(policy)
        try:
            yield
        finally:
            module.download_image = original
