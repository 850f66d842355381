#!/usr/bin/env python3
"""Test server: HTTP on PORT (all addresses) that answers every GET with "client <address>\n",
the peer address the app's own accepted socket sees. With a second argument "dual" it listens
on [::] for both families (an IPv4 client then shows as ::ffff:a.b.c.d)."""
import http.server
import socket
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"client {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class DualStackServer(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


if sys.argv[2:] == ["dual"]:
    DualStackServer(("::", int(sys.argv[1])), Handler).serve_forever()
else:
    http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
