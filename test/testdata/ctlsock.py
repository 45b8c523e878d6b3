# The control socket of `nbdcache serve --control unix:PATH`, for the test
# scripts in this folder: HTTP over a Unix socket.
import http.client
import socket
import urllib.parse


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("nbdcache")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def post(path, endpoint, **query):
    """POST endpoint?query on the socket at path: (HTTP status, body)."""
    c = UnixHTTP(path)
    c.request("POST", endpoint + ("?" + urllib.parse.urlencode(query) if query else ""))
    r = c.getresponse()
    return r.status, r.read().decode()
