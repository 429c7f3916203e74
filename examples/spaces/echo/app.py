"""Answers every request with the Space's identity, its variables and the request."""
import http.server
import json
import os

SHOWN = ("SPACE_ID", "SPACE_HOST", "SPACE_AUTHOR_NAME", "SPACE_REPO_NAME", "SYSTEM", "CPU_CORES", "MEMORY", "GREETING")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(
            {
                "env": {k: os.environ.get(k) for k in SHOWN},
                "uid": os.getuid(),
                "path": self.path,
                "headers": {k: v for k, v in self.headers.items() if k.lower().startswith(("host", "x-forwarded"))},
            },
            indent=2,
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    print("echo listening on 0.0.0.0:7860", flush=True)
    http.server.ThreadingHTTPServer(("0.0.0.0", 7860), Handler).serve_forever()
